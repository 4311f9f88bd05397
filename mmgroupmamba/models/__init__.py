from .groupmamba import ARCH_SETTINGS, OUT_TYPES, ClassBlock, GroupMamba, GroupMambaBlock, GroupMambaLayer

__all__ = ['ARCH_SETTINGS', 'OUT_TYPES', 'ClassBlock', 'GroupMamba', 'GroupMambaBlock', 'GroupMambaLayer']

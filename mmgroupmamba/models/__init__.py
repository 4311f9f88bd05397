from .groupmamba import ARCH_SETTINGS, GroupMamba, GroupMambaBlock, GroupMambaLayer

__all__ = ['ARCH_SETTINGS', 'GroupMamba', 'GroupMambaBlock', 'GroupMambaLayer']

"""Classification parts of mmgroupmamba (imported by the configs in configs/mmpretrain/ through custom_imports)."""
from .backbone import ClassBlock, GroupMambaClsBackbone
from .distill import DistillationImageClassifier, distillation_loss
from .head import DistillationLinearClsHead

__all__ = ['ClassBlock', 'GroupMambaClsBackbone', 'DistillationImageClassifier', 'DistillationLinearClsHead',
           'distillation_loss']

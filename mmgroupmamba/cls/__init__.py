"""Classification parts of mmgroupmamba (imported by the configs in configs/mmpretrain/ through custom_imports)."""
from mmgroupmamba.environment import check_classification_imports

check_classification_imports()  # before the modules below import mmpretrain

from .backbone import GroupMambaClsBackbone  # noqa: E402
from .distill import DistillationImageClassifier, distillation_loss  # noqa: E402
from .head import DistillationLinearClsHead  # noqa: E402

__all__ = ['GroupMambaClsBackbone', 'DistillationImageClassifier', 'DistillationLinearClsHead', 'distillation_loss']

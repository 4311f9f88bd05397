"""The official two-head classifier head: a class head and a distillation head on the same feature."""
import torch.nn as nn
from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS


@MODELS.register_module()
class DistillationLinearClsHead(ClsHead):
    """Two linear heads (``head``, ``dist_head``) on the last feature; the prediction is their mean.

    With :class:`DistillationImageClassifier`, ``head`` learns the labels and ``dist_head`` the teacher's
    predictions (DeiT). Trained without a teacher (plain ``ImageClassifier``), both heads learn the labels, each
    with half the weight, so the mean stays the prediction and no parameter goes unused.

    Args:
        num_classes (int): number of classes.
        in_channels (int): feature channels (the backbone's last embed dim).
        loss (dict): label loss (e.g. ``LabelSmoothLoss``; takes Mixup/CutMix soft targets).
        init_cfg (dict): the official initialisation (truncated normal, zero bias).
    """

    def __init__(self,
                 num_classes,
                 in_channels,
                 loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
                 init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.0)):
        super().__init__(loss=loss, init_cfg=init_cfg)
        if num_classes <= 0:
            raise ValueError(f'DistillationLinearClsHead: num_classes must be positive, got {num_classes}')
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.head = nn.Linear(in_channels, num_classes)
        self.dist_head = nn.Linear(in_channels, num_classes)

    def forward_heads(self, feats):
        """Both heads' logits, ``(class_logits, distillation_logits)``."""
        feat = self.pre_logits(feats)
        return self.head(feat), self.dist_head(feat)

    def forward(self, feats):
        """The prediction logits: the mean of both heads (the official eval output)."""
        class_logits, dist_logits = self.forward_heads(feats)
        return (class_logits + dist_logits) / 2

    def label_loss(self, logits, data_samples):
        """The label loss of one head's logits (hard labels or Mixup/CutMix ``gt_score``)."""
        return self._get_loss(logits, data_samples)['loss']

    def loss(self, feats, data_samples):
        class_logits, dist_logits = self.forward_heads(feats)
        return dict(loss_cls=0.5 * self.label_loss(class_logits, data_samples),
                    loss_dist_head=0.5 * self.label_loss(dist_logits, data_samples))

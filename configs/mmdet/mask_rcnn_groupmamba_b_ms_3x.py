# Mask R-CNN + FPN with GroupMamba-B on COCO, 3x multi-scale: the T 3x recipe (mask_rcnn_groupmamba_t_ms_3x.py).
_base_ = './mask_rcnn_groupmamba_t_ms_3x.py'

# The official GroupMamba-B ImageNet-1k checkpoint (path or URL).
pretrained = 'checkpoints/groupmamba_base.pth'

# Drop-path rate per size: see mask_rcnn_groupmamba_t.py.
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 424, 512]))

# Mask R-CNN + FPN with GroupMamba-B on COCO, 3x multi-scale: the T 3x recipe (mask_rcnn_groupmamba_t_ms_3x.py).
_base_ = './mask_rcnn_groupmamba_t_ms_3x.py'

# The official GroupMamba-B ImageNet-1k weights (URL or the path of a downloaded copy).
pretrained = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Base/resolve/main/groupmamba_base_ema.pth'

# Drop-path rate per size: see mask_rcnn_groupmamba_t.py.
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 424, 512]))

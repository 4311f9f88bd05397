# Mask R-CNN + FPN with GroupMamba-S on COCO, 1x schedule: the T recipe (see mask_rcnn_groupmamba_t.py,
# also for the drop-path rate per size).
_base_ = './mask_rcnn_groupmamba_t.py'

# The official GroupMamba-S ImageNet-1k weights (URL or the path of a downloaded copy).
pretrained = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Small/resolve/main/groupmamba_small_ema.pth'

model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 348, 512]))

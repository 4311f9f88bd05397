# Mask R-CNN + FPN with GroupMamba-T on COCO, 1x schedule (12 epochs), following VMamba's detection protocol:
# AdamW lr 1e-4, weight decay 0.05, linear warm-up then x0.1 at epochs 8 and 11, 16 images per iteration
# (2 per GPU x 8 GPUs; `--auto-scale-lr` rescales lr for other totals), AMP.
# Paper (arXiv 2407.13772): box AP 47.6, mask AP 42.9.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/groupmamba_no_decay.py',
]
custom_imports = dict(imports=['mmgroupmamba', 'mmgroupmamba.det'], allow_failed_imports=False)
# Checks data, weights and device before anything is built and reports what is missing with the fix
# (mmgroupmamba/runner.py); missing_data_help is its word on this config's data.
runner_type = 'PreflightRunner'
missing_data_help = (
    "COCO 2017 goes in data/coco/ in mmdet's layout (annotations/instances_{train,val}2017.json, train2017/, "
    'val2017/): see docs/detection.md, "Train and test on COCO", and docs/getting_started.md. Without COCO, '
    'the CPU demo configs/mmdet/mask_rcnn_groupmamba_demo_shapes.py generates its data')

# The official GroupMamba-T ImageNet-1k weights (mmgroupmamba.checkpoint.OFFICIAL_WEIGHTS), downloaded on first use
# into torch's hub cache. Offline: download the file elsewhere and pass its path with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH.
pretrained = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Tiny/resolve/main/groupmamba_tiny_ema.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='GroupMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        # Stochastic depth per size: T 0.2, S 0.3, B 0.6, the rates of VMamba's detection configs for its T, S
        # and B (the official GroupMamba repo releases no detection settings), as the mmseg configs here use.
        drop_path_rate=0.2,
        # The conv stem's BatchNorm keeps its ImageNet statistics, as mmdet does for pretrained BN backbones
        # at 2 images per GPU; its affine parameters still train.
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # GroupMamba.embed_dims of the arch (T: 64, 128, 348, 448).
    neck=dict(in_channels=[64, 128, 348, 448]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    # paramwise_cfg's per-parameter groups merged by equal settings (~1300 groups otherwise; mmgroupmamba/optim.py).
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # No weight decay on norms nor on the selective scan's parameters (configs/_base_/groupmamba_no_decay.py).
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={{_base_.groupmamba_no_decay_keys}}))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

# Random states in every checkpoint, so that a resumed training continues exactly (mmgroupmamba/hooks.py).
custom_hooks = [dict(type='RandomStateHook')]

# Mask R-CNN + FPN with GroupMamba-T on COCO, 1x schedule (12 epochs): VMamba's detection recipe
# (VMamba detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py), which is mmdet's Swin-T Mask R-CNN 1x config
# with another backbone. Everything but the backbone, FPN's input channels and the optimizer wrapper's type is
# inherited from that Swin-T config: AdamW lr 1e-4, weight decay 0.05 except for names containing `norm`,
# linear warm-up over 1000 iterations, lr x0.1 at epochs 8 and 11, 16 images per iteration (2 per GPU x 8
# GPUs; `--auto-scale-lr` rescales lr for other totals). docs/detection.md has the recipe table.
# Paper (arXiv 2407.13772): box AP 47.6, mask AP 42.9.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/preflight.py']
custom_imports = dict(imports=['mmgroupmamba', 'mmgroupmamba.det'], allow_failed_imports=False)
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
        # at 2 images per GPU (VMamba's backbone has no BatchNorm: docs/detection.md); its affine parameters
        # still train.
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # GroupMamba.embed_dims of the arch (T: 64, 128, 348, 448).
    neck=dict(in_channels=[64, 128, 348, 448]))

optim_wrapper = dict(
    # Mixed precision for speed; VMamba trains in fp32 (OptimWrapper). The reference recipe is one option away:
    # --cfg-options optim_wrapper.type=OptimWrapper
    type='AmpOptimWrapper',
    # paramwise_cfg's per-parameter groups merged by equal settings (~1300 groups otherwise; mmgroupmamba/optim.py).
    constructor='MergedGroupsOptimWrapperConstructor')

# Random states in every checkpoint, so that a resumed training continues exactly (mmgroupmamba/hooks.py).
custom_hooks = [dict(type='RandomStateHook')]

# UperNet + GroupMamba-T on ADE20K, 160k iterations of 512x512 crops, batch 16 (8 GPUs x 2): VMamba's recipe
# (VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py), which is mmseg's Swin-T
# UperNet config with another backbone. Inherited from that Swin-T config: AdamW lr 6e-5, weight decay 0.01
# except for names containing `norm`, 1500-iteration linear warmup then poly decay (power 1), the ADE20K
# pipelines, whole-image testing and the multi-scale + flip TTA (`--tta`). docs/segmentation.md has the
# recipe table.
# Paper: 48.6 mIoU single-scale, 49.2 multi-scale.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py', '../_base_/preflight.py'
]

missing_data_help = (
    "ADE20K goes in data/ade/ADEChallengeData2016 in mmseg's layout (images/{training,validation}, "
    'annotations/{training,validation}): see docs/segmentation.md, "Train and test on ADE20K". Without ADE20K, '
    'the CPU demo generates its data: python -m mmgroupmamba.seg.demo_data --out data/ade_demo '
    '--num-train 200 --num-val 40, then configs/mmseg/upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py')

# The official GroupMamba-T ImageNet-1k weights (mmgroupmamba.checkpoint.OFFICIAL_WEIGHTS), downloaded on first use
# into torch's hub cache. Offline: download the file elsewhere and pass its path with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH.
checkpoint_file = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Tiny/resolve/main/groupmamba_tiny_ema.pth'
model = dict(
    backbone=dict(
        _delete_=True,  # nothing of the Swin backbone may leak in
        type='GroupMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # The stem's BatchNorm sees 2 images per GPU: synchronised like the heads' BatchNorms, as mmseg trains
        # BN backbones (VMamba's backbone has no BatchNorm: docs/segmentation.md).
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        # Every training crop is 512x512: training replays forward and backward from CUDA graphs (one H200,
        # stock mim train at commit 410b4c1: 0.095 s/iter against 0.255 eagerly; README). Evaluation's whole
        # images come in many sizes and run eagerly. Not yet run with several GPUs (SyncBN inside the graphs);
        # off with --cfg-options model.backbone.cuda_graph=False.
        cuda_graph='train',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[64, 128, 348, 448]),
    auxiliary_head=dict(in_channels=348))

optim_wrapper = dict(
    # Mixed precision for speed; VMamba trains in fp32 (OptimWrapper). The reference recipe is one option away:
    # --cfg-options optim_wrapper.type=OptimWrapper
    type='AmpOptimWrapper',
    # paramwise_cfg's per-parameter groups merged by equal settings (~1200 groups otherwise; mmgroupmamba/optim.py).
    # paramwise_cfg itself is the Swin config's, as in VMamba: decay 0 for names containing `norm` (its keys
    # for Swin's position tables match no GroupMamba parameter).
    constructor='MergedGroupsOptimWrapperConstructor')

# Random states in every checkpoint, so that a resumed training continues exactly (mmgroupmamba/hooks.py).
custom_hooks = [dict(type='RandomStateHook')]

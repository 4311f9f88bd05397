# GroupMamba-T on ImageNet-1k with the paper's recipe (8 GPUs x 128 images): 300 epochs, AdamW, DeiT-style hard
# distillation from RegNetY-16GF. Set model.teacher.checkpoint to DeiT's RegNetY-16GF weights
# (regnety_160-a5fe301d.pth); training with this teacher needs timm (`pip install timm`), evaluation does not.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',  # RandAugment m9, random erasing 0.25, bicubic
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',  # lr 1e-3 @ 1024, wd 0.05, 20 warm-up ep, cosine
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/preflight.py',
]
custom_imports = dict(imports=['mmgroupmamba', 'mmgroupmamba.cls'], allow_failed_imports=False)
missing_data_help = (
    "ImageNet-1k goes in data/imagenet in mmpretrain's layout (train/, val/, meta/train.txt, meta/val.txt): see "
    'docs/classification.md. Without ImageNet, the CPU demo generates its data: '
    'python -m mmgroupmamba.cls.demo_data data/groupmamba_cls_demo, then configs/mmpretrain/demo/')

model = dict(
    type='DistillationImageClassifier',
    # The official classifier's output: its class token (the rate is the official train.py's).
    # Training batches are all 128 x 224x224 (drop_last below): training replays forward and backward from CUDA
    # graphs (backbone alone on one H200 at f881035: 1479 img/s against 451 eagerly; README, Speed), evaluation
    # runs eagerly. Not yet run through mmpretrain on a GPU; off with --cfg-options model.backbone.cuda_graph=False.
    backbone=dict(type='GroupMamba', arch='tiny', out_type='cls_token', drop_path_rate=0.05, cuda_graph='train'),
    head=dict(
        type='DistillationLinearClsHead',
        num_classes=1000,  # in_channels: the backbone's last embed dim (448 for T)
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    teacher=dict(
        model=dict(
            type='ImageClassifier',
            backbone=dict(type='TIMMBackbone', model_name='regnety_160', pretrained=False),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=1000, in_channels=3024)),
        checkpoint='checkpoints/regnety_160-a5fe301d.pth',
        # DeiT's file holds timm's keys: the classifier stays `head.fc`, the rest goes into the TIMMBackbone.
        revise_keys=[(r'^(?!head\.fc\.)', 'backbone.timm_model.')]),
    distillation='hard',
    alpha=0.5,
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

# drop_last: the official loader drops the last incomplete batch (classification/data/build.py).
train_dataloader = dict(batch_size=128, drop_last=True)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='AmpOptimWrapper',
    # paramwise_cfg's per-parameter groups merged by equal settings (~1200 groups otherwise; mmgroupmamba/optim.py).
    constructor='MergedGroupsOptimWrapperConstructor',
    clip_grad=dict(max_norm=5.0),
    # The official rule (classification/utils/optimizer.py, set_weight_decay): no decay for 1-D parameters and
    # for names ending in `.bias`, and nothing else -- the official model has no no_weight_decay list. So the
    # 2-D scan parameters A_logs (d, 1) and dt_projs_bias (1, d) are decayed, Ds and skip_scale are not.
    # The base's norm_decay_mult and Swin's custom_keys are dropped: with these two, mmengine already gives
    # every norm parameter (1-D) decay 0.
    paramwise_cfg=dict(_delete_=True, flat_decay_mult=0.0, bias_decay_mult=0.0))

# The official scheduler steps every iteration (timm's CosineLRScheduler, t_in_epochs=False) and scales its
# minimum lr (5e-6 at batch 512) with the batch size like the lr; the base's cosine steps once an epoch to a
# fixed 1e-5.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=True, begin=20, convert_to_iter_based=True),
]

# The official EMA (timm's ModelEma, decay 0.9999) averages the buffers too: the stem's BatchNorm statistics.
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, update_buffers=True, priority='ABOVE_NORMAL'),
    # Random states in every checkpoint: resuming continues exactly (mmgroupmamba/hooks.py).
    dict(type='RandomStateHook'),
]

auto_scale_lr = dict(base_batch_size=1024, enable=True)

# The official train.py seeds 0 + rank and turns cuDNN's autotuner on (fixed 224x224 batches).
randomness = dict(seed=0, diff_rank_seed=True)
env_cfg = dict(cudnn_benchmark=True)

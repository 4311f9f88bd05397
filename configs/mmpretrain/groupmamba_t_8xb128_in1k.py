# GroupMamba-T on ImageNet-1k with the paper's recipe (8 GPUs x 128 images): 300 epochs, AdamW, DeiT-style hard
# distillation from RegNetY-16GF. Set model.teacher.checkpoint to DeiT's RegNetY-16GF weights
# (regnety_160-a5fe301d.pth); training with this teacher needs timm (`pip install timm`), evaluation does not.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',  # RandAugment m9, random erasing 0.25, bicubic
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',  # lr 1e-3 @ 1024, wd 0.05, 20 warm-up ep, cosine
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmgroupmamba', 'mmgroupmamba.cls'], allow_failed_imports=False)
# Checks data, weights and device before anything is built and reports what is missing with the fix
# (mmgroupmamba/runner.py); missing_data_help is its word on this config's data.
runner_type = 'PreflightRunner'
missing_data_help = (
    "ImageNet-1k goes in data/imagenet in mmpretrain's layout (train/, val/, meta/train.txt, meta/val.txt): see "
    'docs/classification.md. Without ImageNet, the CPU demo generates its data: '
    'python -m mmgroupmamba.cls.demo_data data/groupmamba_cls_demo, then configs/mmpretrain/demo/')

model = dict(
    type='DistillationImageClassifier',
    # The official classifier's output: its class token (the rate is the official train.py's).
    backbone=dict(type='GroupMamba', arch='tiny', out_type='cls_token', drop_path_rate=0.05),
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

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='AmpOptimWrapper',
    # paramwise_cfg's per-parameter groups merged by equal settings (~1200 groups otherwise; mmgroupmamba/optim.py).
    constructor='MergedGroupsOptimWrapperConstructor',
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        # No weight decay on the scan's parameters, the skip scale, norms, biases and other 1-D parameters.
        custom_keys=dict(
            _delete_=True,
            **{key: dict(decay_mult=0.0)
               for key in ('.A_logs', '.Ds', '.dt_projs_bias', '.skip_scale')})))

custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),  # the official EMA decay 0.9999
    dict(type='RandomStateHook'),  # random states in every checkpoint: resuming continues exactly (mmgroupmamba/hooks.py)
]

auto_scale_lr = dict(base_batch_size=1024, enable=True)

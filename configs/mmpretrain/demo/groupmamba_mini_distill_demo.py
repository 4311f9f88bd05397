# CPU demo of the T recipe: the small test architecture distilled from a tiny ResNet teacher on the generated
# 10-class dataset (python -m mmgroupmamba.cls.demo_data). Train the teacher first with
# resnet_mini_demo_teacher.py; docs/classification.md has the commands.
_base_ = '../groupmamba_t_8xb128_in1k.py'

demo_root = 'data/groupmamba_cls_demo'
missing_data_help = ('The demo data are generated: python -m mmgroupmamba.cls.demo_data data/groupmamba_cls_demo '
                     '(docs/classification.md, "CPU demo")')
# A fixed seed (weights, data order, augmentations): the README's numbers are this seed's run; other seeds
# and their spread: python benchmarks/demo_seeds.py.
randomness = dict(seed=0)

model = dict(
    backbone=dict(
        arch='mini'),
    head=dict(num_classes=10, in_channels=128),
    teacher=dict(
        _delete_=True,
        model='configs/mmpretrain/demo/resnet_mini_demo_teacher.py',
        checkpoint='work_dirs/resnet_mini_demo_teacher/epoch_8.pth'))
data_preprocessor = dict(num_classes=10)  # merged into the base's (mean, std, to_rgb), given to the model

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=73, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=64),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32, num_workers=2, persistent_workers=True,
    dataset=dict(data_root=demo_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=40, num_workers=2, persistent_workers=True,
    dataset=dict(data_root=demo_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# CPU: no AMP; a short schedule at a fixed lr (no scaling from batch 1024).
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=2e-3))
auto_scale_lr = dict(enable=False)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1),
]
train_cfg = dict(max_epochs=8, val_interval=4)
custom_hooks = [
    dict(type='EMAHook', momentum=0.02, priority='ABOVE_NORMAL'),  # 80 iterations: a short average
    dict(type='RandomStateHook'),  # random states in every checkpoint: resuming continues exactly
]
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=4))

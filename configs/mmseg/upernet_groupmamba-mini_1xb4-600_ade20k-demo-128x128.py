# CPU demo: UperNet with a small GroupMamba, trained from scratch for 600 iterations on the generated
# ADE20K-format street scenes (python -m mmgroupmamba.seg.demo_data). Everything not set here is the
# GroupMamba-T ADE20K config: the stock ADE20KDataset (restricted to the 6 generated classes through its
# metainfo), IoUMetric, whole-image testing at any size and `--tta`.
_base_ = './upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'

data_root = 'data/ade_demo'
missing_data_help = ('The demo data are generated: python -m mmgroupmamba.seg.demo_data --out data/ade_demo '
                     '--num-train 200 --num-val 40 (docs/segmentation.md, "CPU demo")')
demo_classes = ('building', 'sky', 'tree', 'road', 'grass', 'car')  # mmgroupmamba.seg.demo_data.DEMO_CLASSES
crop_size = (128, 128)
max_iters = 600
# A fixed seed (weights, data order, augmentations): the README's numbers are this seed's run; other seeds
# and their spread: python benchmarks/demo_seeds.py.
randomness = dict(seed=0)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        # A custom arch replaces the base's arch name.
        arch='mini',
        drop_path_rate=0.0,
        norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=None),  # from scratch: no ImageNet weights for this arch
    # Narrower heads than UperNet's 512/256 channels keep a CPU iteration around a second.
    decode_head=dict(
        in_channels=[32, 64, 96, 128],
        channels=128,
        num_classes=len(demo_classes),
        norm_cfg=dict(type='BN', requires_grad=True)),
    auxiliary_head=dict(
        in_channels=96, channels=64, num_classes=len(demo_classes), norm_cfg=dict(type='BN', requires_grad=True)))

# The generated images have a short side of 112-168 pixels: ADE20K's 512-pixel scales shrunk to 128.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
dataset = dict(data_root=data_root, metainfo=dict(classes=demo_classes))
train_dataloader = dict(batch_size=4, num_workers=1, dataset=dict(**dataset, pipeline=train_pipeline))
val_dataloader = dict(num_workers=1, dataset=dict(**dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader

# Trained from scratch, so a larger learning rate and a short warmup; AMP is CUDA-only, so plain fp32.
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=200)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))

# Demo that runs on any machine (2 CPU cores: see docs/detection.md for the measured time and metrics):
# the T recipe's Mask R-CNN + FPN, trained from scratch on generated shapes (ShapesCocoDataset writes
# data/shapes_coco/ on first use) with the small GroupMamba arch of the CPU tests, 128 px images and fewer
# RoIs, then evaluated with CocoMetric (bbox and segm).
_base_ = './mask_rcnn_groupmamba_t.py'

data_root = 'data/shapes_coco/'
num_classes = 3  # rectangle, ellipse, triangle
image_scale = (128, 128)
head_channels = 64
# A fixed seed (weights, data order, augmentations): the README's numbers are this seed's run; other seeds
# and their spread: python benchmarks/demo_seeds.py.
randomness = dict(seed=0)

model = dict(
    # A 2-core CPU trains the T backbone at ~20 s per iteration; this arch keeps the demo within minutes.
    # No ImageNet weights: the shapes are learnt from scratch (so the stem's BatchNorm learns its statistics),
    # and a short schedule needs no stochastic depth.
    backbone=dict(
        arch='mini',
        drop_path_rate=0.0,
        norm_eval=False,
        init_cfg=None),
    # The 3x3 convs of FPN, RPN and the mask head dominate a CPU step at COCO's 256 channels; shapes on flat
    # backgrounds need far fewer, and at most 4 objects per image far fewer proposals and sampled RoIs.
    neck=dict(in_channels=[32, 64, 96, 128], out_channels=head_channels),
    rpn_head=dict(in_channels=head_channels, feat_channels=head_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=head_channels),
        bbox_head=dict(in_channels=head_channels, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=head_channels),
        mask_head=dict(in_channels=head_channels, conv_out_channels=head_channels, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# Merged into the base's COCO loaders: the dataset class, its files, the pipelines and the generator's settings
# change; the samplers, persistent workers, backend_args and validation's test_mode are the base's.
shapes_dataset = dict(type='ShapesCocoDataset', data_root=data_root, image_size=image_scale[0])
demo_loader = dict(batch_size=8, num_workers=1)
train_dataloader = dict(
    **demo_loader,
    dataset=dict(
        **shapes_dataset,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        num_images=512,
        seed=0,
        # No size filter: the base drops images under 32 px a side, and smaller generated images stay usable.
        filter_cfg=dict(min_size=0),
        pipeline=train_pipeline))
# Validation: another set from the same generator (its own seed), with the test pipeline.
val_dataloader = dict(
    **demo_loader,
    dataset=dict(**shapes_dataset, ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 num_images=64, seed=1, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# From scratch on 8 images per step: a larger lr than the fine-tuning recipe's 1e-4, and plain fp32 because
# mmengine's AmpOptimWrapper needs a GPU.
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-3))
auto_scale_lr = dict(base_batch_size=8)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[6, 7], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs))

# The demo's teacher: a small mmpretrain ResNet-18 trained with labels only on the demo data, same schedule.
_base_ = './groupmamba_mini_distill_demo.py'

model = dict(
    _delete_=True,
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=16, base_channels=16),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=128))
custom_hooks = [dict(type='RandomStateHook')]  # no EMA for the teacher

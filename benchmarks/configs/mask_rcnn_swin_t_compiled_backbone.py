# mmdet's own Swin-T Mask R-CNN with only its backbone run through torch.compile, the way GroupMamba's
# `model.backbone.compile=True` runs GroupMamba's (the same CompiledForward, through CompileBackboneHook): the
# yardstick of benchmarks/gpu_e2e.sh's det_compile step. Run with --amp, as the swin step does.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)
# Dynamic sizes as GroupMamba's default; without fullgraph, as backbone_speed.py compiles Swin-T.
custom_hooks = [dict(type='CompileBackboneHook', options=dict(fullgraph=False))]

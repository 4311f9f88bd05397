# mmdet's own Swin-T Mask R-CNN with its backbone compiled for fixed sizes: training batches padded to the seven
# sizes of configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py (tests/test_compile_hook.py checks they are the same)
# and the backbone compiled once for each (dynamic=False). With dynamic sizes, Dynamo's shape reasoning over
# Swin's window padding did not finish tracing one step in 420 s (README, thirty-fourth session). The yardstick of
# gpu_e2e.sh's det_compile_fixed step (mask_rcnn_groupmamba_t_compiled_fixed_sizes.py).
_base_ = './mask_rcnn_swin_t_compiled_backbone.py'
# BatchPadToFixedSizes is registered by mmgroupmamba.det, which the base's `mmgroupmamba` does not import.
custom_imports = dict(imports=['mmgroupmamba', 'mmgroupmamba.det'], allow_failed_imports=False)
model = dict(data_preprocessor=dict(batch_augments=[
    dict(type='BatchPadToFixedSizes',
         sizes=[(800, 1088), (800, 1216), (800, 1344), (1088, 800), (1216, 800), (1344, 800), (1344, 1344)],
         pad_mask=True),
]))
custom_hooks = [dict(type='CompileBackboneHook', options=dict(fullgraph=False, dynamic=False))]

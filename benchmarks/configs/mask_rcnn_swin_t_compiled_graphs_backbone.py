# mmdet's own Swin-T Mask R-CNN with its backbone compiled in torch.compile's mode='reduce-overhead' (CUDA graphs),
# through the same hook as mask_rcnn_swin_t_compiled_backbone.py: the yardstick of gpu_e2e.sh's det_compile_graphs.
_base_ = './mask_rcnn_swin_t_compiled_backbone.py'
custom_hooks = [dict(type='CompileBackboneHook', options=dict(fullgraph=False, mode='reduce-overhead'))]

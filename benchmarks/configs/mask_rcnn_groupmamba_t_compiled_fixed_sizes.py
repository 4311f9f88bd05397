# The Mask R-CNN GroupMamba-T config with its training batches padded to seven fixed sizes (the CUDA-graph config's)
# and its backbone compiled once for each size (dynamic=False) instead of recorded as CUDA graphs: gpu_e2e.sh's
# det_compile_fixed step, against swin_compile_fixed (mask_rcnn_swin_t_compiled_fixed_sizes.py).
_base_ = '../../configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py'
model = dict(backbone=dict(cuda_graph=False, compile=dict(dynamic=False)))

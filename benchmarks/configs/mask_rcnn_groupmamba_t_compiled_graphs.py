# The Mask R-CNN GroupMamba-T config with its backbone compiled and replayed from CUDA graphs (torch.compile's
# mode='reduce-overhead': a graph recorded per batch size met, the host's launches gone): gpu_e2e.sh's
# det_compile_graphs step, against swin_compile_graphs (mask_rcnn_swin_t_compiled_graphs_backbone.py).
_base_ = '../../configs/mmdet/mask_rcnn_groupmamba_t.py'
model = dict(backbone=dict(compile=dict(mode='reduce-overhead')))

"""GroupMamba's fused ops: the selective scan, the gated group norm after it, the modulated LayerNorm, the
residual add with the LayerNorm after it, the depthwise conv + activation and the channel-affinity MLP. Each is a
PyTorch custom op (``torch.library``, namespace ``mmgroupmamba``) with fake and autograd registrations, running a
Triton kernel on CUDA tensors and a readable PyTorch reference (``reference.py``) elsewhere; ``dispatch.py`` says
which.

Installed as ``mmgroupmamba.kernels``.
"""
from .affinity import channel_affinity
from .directions import SCAN_DIRECTIONS, scan_order_index
from .dwconv import depthwise_conv_act, dwconv_act_backward, dwconv_act_forward
from .fused_linear import (
    depthwise_conv_act_linear,
    gated_group_norm_linear,
    layer_norm_linear,
    modulated_layer_norm_linear,
    residual_layer_norm_linear,
)
from .gated_norm import gated_group_norm, layer_norm, modulated_layer_norm, residual_layer_norm
from .reference import (
    channel_affinity_reference,
    depthwise_conv_act_reference,
    gated_group_norm_reference,
    linear_recurrence,
    modulated_layer_norm_reference,
    selective_scan_reference,
)
from .scan import selective_scan

__all__ = ['SCAN_DIRECTIONS', 'scan_order_index', 'linear_recurrence', 'selective_scan',
           'selective_scan_reference', 'gated_group_norm', 'gated_group_norm_linear', 'gated_group_norm_reference',
           'layer_norm', 'layer_norm_linear', 'depthwise_conv_act', 'depthwise_conv_act_reference',
           'depthwise_conv_act_linear', 'dwconv_act_forward', 'dwconv_act_backward', 'modulated_layer_norm',
           'modulated_layer_norm_linear', 'modulated_layer_norm_reference', 'channel_affinity',
           'channel_affinity_reference', 'residual_layer_norm', 'residual_layer_norm_linear']

"""GroupMamba's fused ops: the selective scan, the gated group norm after it and the depthwise conv + activation,
each a Triton kernel beside a readable PyTorch reference (``reference.py``).

Installed as ``mmgroupmamba.kernels``.
"""
from .directions import SCAN_DIRECTIONS, scan_order_index
from .dwconv import depthwise_conv_act, dwconv_act_backward, dwconv_act_forward
from .gated_norm import (gated_group_norm, gated_group_norm_linear, layer_norm, layer_norm_linear,
                         modulated_layer_norm, modulated_layer_norm_linear)
from .reference import (depthwise_conv_act_reference, gated_group_norm_reference, linear_recurrence,
                        modulated_layer_norm_reference, selective_scan_reference)
from .scan import selective_scan

__all__ = ['SCAN_DIRECTIONS', 'scan_order_index', 'linear_recurrence', 'selective_scan',
           'selective_scan_reference', 'gated_group_norm', 'gated_group_norm_linear', 'gated_group_norm_reference',
           'layer_norm', 'layer_norm_linear', 'depthwise_conv_act', 'depthwise_conv_act_reference',
           'dwconv_act_forward', 'dwconv_act_backward', 'modulated_layer_norm', 'modulated_layer_norm_linear',
           'modulated_layer_norm_reference']

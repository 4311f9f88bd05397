"""The fused 3x3 depthwise conv + bias + activation of GroupMamba's Mamba layer (SiLU) and FFN (GELU)."""
from .reference import depthwise_conv_act_reference
from .scan import use_triton


def depthwise_conv_act(x, weight, bias, activation):
    """``act(depthwise_conv3x3(x) + bias)`` of a channels-last map, zero padding 1, stride 1.

    Args:
        x (Tensor): ``(B, H, W, C)``; a channel slice of a wider tensor is read in place by the Triton path.
        weight (Tensor): ``(C, 1, 3, 3)``, as ``nn.Conv2d(C, C, 3, groups=C)`` holds it.
        bias (Tensor): ``(C,)``.
        activation (str): ``'silu'`` or ``'gelu'`` (exact, erf).

    Returns:
        Tensor: contiguous ``(B, H, W, C)`` in x's dtype.

    Dispatch follows ``MMGM_SCAN_IMPL`` like :func:`selective_scan`: Triton on CUDA tensors by default.
    """
    if use_triton(x):
        from .triton_dwconv import depthwise_conv_act_triton
        return depthwise_conv_act_triton(x, weight, bias, activation)
    return depthwise_conv_act_reference(x, weight, bias, activation)

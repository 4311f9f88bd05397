"""The fused 3x3 depthwise conv + bias + activation of GroupMamba's Mamba layer (SiLU) and FFN (GELU)."""
import torch

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


def dwconv_act_forward(x, weight, bias, activation):
    """:func:`depthwise_conv_act` without autograd, for a caller whose own backward recomputes it."""
    if use_triton(x):
        from .triton_dwconv import dwconv_act_forward as forward
        return forward(x, weight, bias, activation)
    with torch.no_grad():
        return depthwise_conv_act_reference(x, weight, bias, activation)


def dwconv_act_backward(dout, x, weight, bias, activation, need_output=False, reuse_dout=False):
    """Gradients of :func:`depthwise_conv_act` from its input alone: ``(dx, dweight, dbias, output or None)``.

    ``need_output=True`` also returns the recomputed output. The reference path recomputes it with autograd.
    ``reuse_dout=True``: the caller gives up ``dout``, whose memory the Triton path may write ``dx`` into.
    """
    if use_triton(x):
        from .triton_dwconv import dwconv_act_backward as backward
        return backward(dout, x, weight, bias, activation, need_output, reuse_dout)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
        out = depthwise_conv_act_reference(*inputs, activation)
        dx, dweight, dbias = torch.autograd.grad(out, inputs, dout)
    return dx, dweight, dbias, (out.detach() if need_output else None)

"""The fused 3x3 depthwise conv + bias + activation of GroupMamba's Mamba layer (SiLU) and FFN (GELU), as the
custom ops ``mmgroupmamba::dwconv_act_fwd`` / ``..._bwd``: Triton on CUDA tensors, the reference elsewhere.
"""
import torch

from .dispatch import triton_module
from .ops_util import cast, empty, fused_op, reduced_dtype, reference_grads, with_ones_column_shape
from .reference import check_dwconv_activation, depthwise_conv_act_reference


def _forward_reference(x, weight, bias, activation):
    with torch.no_grad():
        return depthwise_conv_act_reference(x, weight, bias, activation)


@fused_op('mmgroupmamba::dwconv_act_fwd', reference=_forward_reference)
def dwconv_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(dwconv3x3(x) + bias)``; contiguous ``(B, H, W, C)`` in x's dtype. A channel slice of a wider map
    is read in place by the Triton path."""
    return triton_module('triton_dwconv', x.device).dwconv_act_forward(x, weight, bias, activation)


@dwconv_act_forward.register_fake
def _(x, weight, bias, activation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _backward_reference(dout, x, weight, bias, activation, need_output):
    (dx, dweight, dbias), out = reference_grads(
        lambda *t: depthwise_conv_act_reference(*t, activation), (x, weight, bias), dout, need_output)
    dparams = torch.cat([dweight.reshape(-1), dbias]).to(reduced_dtype(x))
    return dx, dparams, (out if need_output else empty(x))


@fused_op('mmgroupmamba::dwconv_act_bwd', reference=_backward_reference)
def dwconv_act_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str,
                   need_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dparams, output)``: ``dparams`` the ``(10 * C,)`` weight and bias gradients (fp32; fp64 for fp64 x) (see
    :func:`split_param_grads`), ``output`` the recomputed forward output with its ones column
    (``ops_util.with_ones_column``), empty unless ``need_output``."""
    launch = triton_module('triton_dwconv', x.device).dwconv_act_backward
    dx, dparams, out = launch(dout, x, weight, bias, activation, need_output)
    return dx, dparams, (out if need_output else empty(x))


@dwconv_act_bwd.register_fake
def _(dout, x, weight, bias, activation, need_output):
    out = torch.empty(with_ones_column_shape(x.shape), dtype=x.dtype, device=x.device) if need_output else empty(x)
    dparams = x.new_empty((10 * x.shape[-1],), dtype=reduced_dtype(x))
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dparams, out


def split_param_grads(dparams, weight, bias):
    """``dparams`` -> the weight and bias gradients in their parameters' shapes and dtypes."""
    channels = bias.shape[0]
    return cast(dparams[:9 * channels].view(weight.shape), weight.dtype), cast(dparams[9 * channels:], bias.dtype)


def dwconv_act_backward(dout, x, weight, bias, activation, need_output=False):
    """Gradients of :func:`depthwise_conv_act` from its input alone: ``(dx, dweight, dbias, output or None)``;
    ``need_output=True`` also returns the recomputed output with its ones column (a following linear layer's
    weight and bias gradients need it)."""
    dx, dparams, out = dwconv_act_bwd(dout, x, weight, bias, activation, need_output)
    return (dx, *split_param_grads(dparams, weight, bias), (out if need_output else None))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _backward(ctx, dout):
    dx, dweight, dbias, _ = dwconv_act_backward(dout, *ctx.saved_tensors, ctx.activation)
    return dx, dweight, dbias, None


dwconv_act_forward.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv_act(x, weight, bias, activation):
    """``act(depthwise_conv3x3(x) + bias)`` of a channels-last map, zero padding 1, stride 1.

    Args:
        x (Tensor): ``(B, H, W, C)``; a channel slice of a wider tensor is read in place by the Triton path.
        weight (Tensor): ``(C, 1, 3, 3)``, as ``nn.Conv2d(C, C, 3, groups=C)`` holds it.
        bias (Tensor): ``(C,)``.
        activation (str): ``'silu'`` or ``'gelu'`` (exact, erf).

    Returns:
        Tensor: contiguous ``(B, H, W, C)`` in x's dtype. Only ``x`` (and the parameters) are kept for
        backward, which recomputes the pre-activation.

    Dispatch follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    check_dwconv_activation(activation)
    if x.dim() != 4:
        raise ValueError(f'x must be (B, H, W, C), got shape {tuple(x.shape)}')
    return dwconv_act_forward(x, weight, bias, activation)

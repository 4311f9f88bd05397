"""The fused per-group LayerNorm + SiLU gate that follows the scan in a GroupMamba layer, and LayerNorm.

Each norm also comes followed by a linear layer (``*_linear``): on CUDA that pair keeps for backward only
what the norm keeps, not the norm's output as well (see ``triton_gated_norm.NormLinearFn``).
"""
import torch.nn.functional as F

from .reference import gated_group_norm_reference, modulated_layer_norm_reference
from .scan import use_triton


def gated_group_norm(y, z, weight, bias, groups, eps):
    """``(LayerNorm_per_group(y) * weight + bias) * silu(z)`` over the last dim (``groups`` equal groups).

    Args:
        y (Tensor): ``(..., C)`` scan output.
        z (Tensor): ``(..., C)`` gate input (same shape).
        weight, bias (Tensor): ``(C,)``: the groups' LayerNorm affines, concatenated.
        groups (int): number of channel groups; each is normalised on its own.
        eps (float): LayerNorm epsilon.

    Dispatch follows ``MMGM_SCAN_IMPL`` like :func:`selective_scan`: Triton on CUDA tensors by default.
    """
    if use_triton(y):
        from .triton_gated_norm import gated_group_norm_triton
        return gated_group_norm_triton(y, z, weight, bias, groups, eps)
    return gated_group_norm_reference(y, z, weight, bias, groups, eps)


def layer_norm(x, weight, bias, eps, out_dtype=None):
    """``F.layer_norm`` over the last dim, through the same kernels on CUDA (PyTorch's runs one thread block
    per row, slow for GroupMamba's 64..512 channels).

    ``out_dtype`` (default: x's): under autocast the normalised map feeds fp16/bf16 matmuls, so writing it in
    that dtype saves a cast of the whole map (and keeps one copy of it for backward instead of two).
    """
    if use_triton(x):
        from .triton_gated_norm import gated_group_norm_triton
        return gated_group_norm_triton(x, None, weight, bias, 1, eps, out_dtype)
    out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return out if out_dtype is None else out.to(out_dtype)


def modulated_layer_norm(y, x, scale, weight, bias, eps):
    """``LayerNorm(y * x * scale[:, None, None, :])`` over the last dim of ``(B, H, W, C)`` maps, in y's dtype.

    ``scale`` is ``(B, C)``: GroupMamba's channel affinity times its skip scale. One fused pass on CUDA, which
    keeps neither the product nor a cast of the scale for backward. Dispatch as :func:`gated_group_norm`.
    """
    if use_triton(y):
        from .triton_gated_norm import modulated_layer_norm_triton
        return modulated_layer_norm_triton(y, x, scale, weight, bias, eps)
    return modulated_layer_norm_reference(y, x, scale, weight, bias, eps)


def gated_group_norm_linear(y, z, weight, bias, groups, eps, linear_weight, linear_bias=None):
    """``F.linear(gated_group_norm(y, z, weight, bias, groups, eps), linear_weight, linear_bias)``."""
    if use_triton(y):
        from .triton_gated_norm import gated_group_norm_linear_triton
        return gated_group_norm_linear_triton(y, z, weight, bias, groups, eps, None, linear_weight, linear_bias)
    return F.linear(gated_group_norm_reference(y, z, weight, bias, groups, eps), linear_weight, linear_bias)


def layer_norm_linear(x, weight, bias, eps, out_dtype, linear_weight, linear_bias=None):
    """``F.linear(layer_norm(x, weight, bias, eps, out_dtype), linear_weight, linear_bias)``."""
    if use_triton(x):
        from .triton_gated_norm import gated_group_norm_linear_triton
        return gated_group_norm_linear_triton(x, None, weight, bias, 1, eps, out_dtype, linear_weight, linear_bias)
    return F.linear(layer_norm(x, weight, bias, eps, out_dtype), linear_weight, linear_bias)


def modulated_layer_norm_linear(y, x, scale, weight, bias, eps, linear_weight, linear_bias=None):
    """``F.linear(modulated_layer_norm(y, x, scale, weight, bias, eps), linear_weight, linear_bias)``."""
    if use_triton(y):
        from .triton_gated_norm import modulated_layer_norm_linear_triton
        return modulated_layer_norm_linear_triton(y, x, scale, weight, bias, eps, linear_weight, linear_bias)
    return F.linear(modulated_layer_norm_reference(y, x, scale, weight, bias, eps), linear_weight, linear_bias)

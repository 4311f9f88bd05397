"""GroupMamba's norms as custom ops: the per-group LayerNorm + SiLU gate after the scan (and, ungated with one
group, plain LayerNorm), and the modulated LayerNorm that ends the layer. Triton on CUDA tensors, the reference
elsewhere; ``*_linear`` variants (``fused_linear.py``) run the linear layer that follows each norm.
"""
from typing import Optional

import torch

from .dispatch import triton_module, use_triton
from .layout import pad_groups, unpad_groups
from .ops_util import cast, empty, fused_op, reduced_dtype, reference_grads, with_ones_column_shape
from .reference import group_layer_norm_reference, modulated_layer_norm_reference


def _padded_group_norm_reference(y, z, weight, bias, groups, eps, out_dtype, out_channels):
    """The reference on maps that may be padded (``layout.py``): their channels compacted, the result padded to
    ``out_channels`` with zeros."""
    valid = weight.numel()
    out = group_layer_norm_reference(unpad_groups(y, valid), None if z is None else unpad_groups(z, valid), weight,
                                     bias, groups, eps, out_dtype)
    return pad_groups(out, out_channels)


def _gated_fwd_reference(y, z, weight, bias, groups, eps, out_dtype, out_channels):
    with torch.no_grad():
        out = _padded_group_norm_reference(y, z, weight, bias, groups, eps, out_dtype, out_channels)
    return out.contiguous(), empty(y, torch.float32), empty(y, torch.float32)


@fused_op('mmgroupmamba::gated_group_norm_fwd', reference=_gated_fwd_reference)
def gated_group_norm_fwd(y: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                         groups: int, eps: float, out_dtype: torch.dtype, out_channels: int) -> tuple[
                             torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``; ``out`` has ``out_channels`` columns; the statistics are the Triton backward's
    (empty on the reference path)."""
    return triton_module('triton_gated_norm', y.device).gated_norm_forward(y, z, weight, bias, groups, eps, out_dtype,
                                                                           out_channels)


@gated_group_norm_fwd.register_fake
def _gated_fwd_fake(y, z, weight, bias, groups, eps, out_dtype, out_channels):
    out = torch.empty((*y.shape[:-1], out_channels), dtype=out_dtype, device=y.device)
    if use_triton(y):
        stats = y.new_empty((y.numel() // y.shape[-1], groups), dtype=torch.float32)
        return out, stats, torch.empty_like(stats)
    return out, empty(y, torch.float32), empty(y, torch.float32)


def _gated_bwd_reference(dout, y, z, weight, bias, mean, rstd, groups, eps, out_dtype, need_output):
    (dy, dz, dw, db), out = reference_grads(
        lambda *t: _padded_group_norm_reference(*t, groups, eps, out_dtype, dout.shape[-1]), (y, z, weight, bias),
        dout, need_output)
    dwb = torch.stack([dw, db]).to(reduced_dtype(y))
    return dy, (empty(y) if dz is None else dz), dwb, (out if need_output else empty(y, out_dtype))


@fused_op('mmgroupmamba::gated_group_norm_bwd', reference=_gated_bwd_reference)
def gated_group_norm_bwd(dout: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor,
                         bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int, eps: float,
                         out_dtype: torch.dtype, need_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """``(dy, dz, dwb, out)``: ``dz`` empty without a gate, ``dwb`` the ``(2, C)`` weight and bias gradients
    (fp32; reduced in one launch), ``out`` (the recomputed output, dout's columns, then the ones column of
    ``ops_util.with_ones_column``) empty unless ``need_output``."""
    dy, dz, dwb, out = triton_module('triton_gated_norm', y.device).gated_norm_backward(
        dout, y, z, weight, bias, mean, rstd, groups, out_dtype, need_output)
    return dy, (empty(y) if dz is None else dz), dwb, (out if need_output else empty(y, out_dtype))


@gated_group_norm_bwd.register_fake
def _gated_bwd_fake(dout, y, z, weight, bias, mean, rstd, groups, eps, out_dtype, need_output):
    out = (torch.empty(with_ones_column_shape(dout.shape), dtype=out_dtype, device=y.device) if need_output
           else empty(y, out_dtype))
    dz = empty(y) if z is None else torch.empty(z.shape, dtype=z.dtype, device=z.device)
    return (torch.empty(y.shape, dtype=y.dtype, device=y.device), dz,
            weight.new_empty((2, *weight.shape), dtype=reduced_dtype(y)), out)


def gated_group_norm_grads(dout, y, z, weight, bias, mean, rstd, groups, eps, out_dtype, need_output):
    """:func:`gated_group_norm_bwd` with its outputs as the inputs' gradients: ``(dy, dz or None, dweight,
    dbias, out or None)``."""
    dy, dz, (dw, db), out = gated_group_norm_bwd(dout, y, z, weight, bias, mean, rstd, groups, eps, out_dtype,
                                                 need_output)
    return (dy, (dz if z is not None else None), cast(dw, weight.dtype), cast(db, bias.dtype),
            (out if need_output else None))


def _gated_setup(ctx, inputs, output):
    y, z, weight, bias, groups, eps, out_dtype, _ = inputs
    ctx.save_for_backward(y, z, weight, bias, output[1], output[2])
    ctx.constants = (groups, eps, out_dtype)
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: no zero fills for them in every backward


def _gated_backward(ctx, dout, _dmean, _drstd):
    dy, dz, dw, db, _ = gated_group_norm_grads(dout, *ctx.saved_tensors, *ctx.constants, False)
    return dy, dz, dw, db, None, None, None, None


gated_group_norm_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


def _per_image(t, keep):
    """``t * keep`` for ``(B, ...)`` maps and one scale an image, ``keep`` ``(B,)``, in fp32 (fp64 for fp64 maps)."""
    compute = reduced_dtype(t)
    return t.to(compute) * keep.to(compute).view(-1, *([1] * (t.dim() - 1)))


def residual_sum_reference(x, branch, keep):
    """``x + branch * keep`` (``keep`` ``(B,)``, one scale an image; None: ``x + branch``), computed in fp32 (fp64
    for fp64 maps) and stored in x's dtype, as the residual norm's kernel stores it."""
    branch = branch.to(reduced_dtype(x)) if keep is None else _per_image(branch, keep)
    return (x.to(reduced_dtype(x)) + branch).to(x.dtype)


def _residual_fwd_reference(x, branch, keep, weight, bias, eps, out_dtype, out_channels):
    with torch.no_grad():
        total = residual_sum_reference(x, branch, keep)
        out = _padded_group_norm_reference(total, None, weight, bias, 1, eps, out_dtype, out_channels)
    return total.contiguous(), out.contiguous(), empty(x, torch.float32), empty(x, torch.float32)


@fused_op('mmgroupmamba::residual_layer_norm_fwd', reference=_residual_fwd_reference)
def residual_layer_norm_fwd(x: torch.Tensor, branch: torch.Tensor, keep: Optional[torch.Tensor], weight: torch.Tensor,
                            bias: torch.Tensor, eps: float, out_dtype: torch.dtype, out_channels: int) -> tuple[
                                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, out, mean, rstd)``: ``total`` the residual sum ``x + branch * keep`` in x's dtype, ``out`` its
    LayerNorm (``out_channels`` columns); statistics as for the gated norm."""
    out, total, mean, rstd = triton_module('triton_gated_norm', x.device).residual_norm_forward(
        x, branch, keep, weight, bias, eps, out_dtype, out_channels)
    return total, out, mean, rstd


@residual_layer_norm_fwd.register_fake
def _(x, branch, keep, weight, bias, eps, out_dtype, out_channels):
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out, mean, rstd = _gated_fwd_fake(total, None, weight, bias, 1, eps, out_dtype, out_channels)
    return total, out, mean, rstd


def _residual_bwd_reference(dout, dtotal, total, keep, weight, bias, mean, rstd, eps, out_dtype, branch_dtype,
                            need_output):
    dx, _, dwb, out = _gated_bwd_reference(dout, total, None, weight, bias, mean, rstd, 1, eps, out_dtype,
                                           need_output)
    compute = reduced_dtype(total)
    dx = dx.to(compute) if dtotal is None else dx.to(compute) + dtotal.to(compute)
    dbranch = empty(total, branch_dtype) if keep is None else _per_image(dx, keep).to(branch_dtype)
    return dx.to(total.dtype), dbranch.contiguous(), dwb, out


@fused_op('mmgroupmamba::residual_layer_norm_bwd', reference=_residual_bwd_reference)
def residual_layer_norm_bwd(dout: torch.Tensor, dtotal: Optional[torch.Tensor], total: torch.Tensor,
                            keep: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, eps: float, out_dtype: torch.dtype, branch_dtype: torch.dtype,
                            need_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dbranch, dwb, out)``: the skip input's gradient (the norm's plus ``dtotal``, the sum's gradient from
    its other readers), the branch's (``dx * keep``; empty without ``keep``, where it is ``dx``), ``dwb`` as for
    the gated norm, ``out`` (with its ones column) empty unless ``need_output``."""
    dx, dbranch, dwb, out = triton_module('triton_gated_norm', total.device).residual_norm_backward(
        dout, dtotal, total, keep, weight, bias, mean, rstd, branch_dtype, out_dtype, need_output)
    return (dx, (empty(total, branch_dtype) if dbranch is None else dbranch), dwb,
            (out if need_output else empty(total, out_dtype)))


@residual_layer_norm_bwd.register_fake
def _(dout, dtotal, total, keep, weight, bias, mean, rstd, eps, out_dtype, branch_dtype, need_output):
    dx, _, dwb, out = _gated_bwd_fake(dout, total, None, weight, bias, mean, rstd, 1, eps, out_dtype, need_output)
    dbranch = empty(total, branch_dtype) if keep is None else torch.empty(
        total.shape, dtype=branch_dtype, device=total.device)
    return dx, dbranch, dwb, out


def residual_layer_norm_grads(dout, dtotal, total, keep, weight, bias, mean, rstd, eps, out_dtype, branch_dtype,
                              need_output):
    """:func:`residual_layer_norm_bwd` with its outputs as the inputs' gradients: ``(dx, dbranch, dweight, dbias,
    out or None)``; ``dout`` None (the norm's output unused) gives ``dtotal`` through and no weight gradients."""
    if dout is None:
        if dtotal is None:
            return None, None, None, None, None
        dbranch = cast(dtotal, branch_dtype) if keep is None else cast(_per_image(dtotal, keep), branch_dtype)
        return dtotal, dbranch, None, None, None
    dx, dbranch, (dw, db), out = residual_layer_norm_bwd(dout, dtotal, total, keep, weight, bias, mean, rstd, eps,
                                                         out_dtype, branch_dtype, need_output)
    if keep is None:  # the branch's gradient is the skip input's (itself where the dtypes agree)
        dbranch = cast(dx, branch_dtype)
    return dx, dbranch, cast(dw, weight.dtype), cast(db, bias.dtype), (out if need_output else None)


def _residual_setup(ctx, inputs, output):
    x, branch, keep, weight, bias, eps, out_dtype, _ = inputs
    ctx.save_for_backward(output[0], keep, weight, bias, output[2], output[3])
    ctx.constants = (eps, out_dtype, branch.dtype)
    ctx.set_materialize_grads(False)  # as the gated norm's; the sum's gradient may be absent too


def _residual_backward(ctx, dtotal, dout, _dmean, _drstd):
    dx, dbranch, dw, db, _ = residual_layer_norm_grads(dout, dtotal, *ctx.saved_tensors, *ctx.constants, False)
    return dx, dbranch, None, dw, db, None, None, None


residual_layer_norm_fwd.register_autograd(_residual_backward, setup_context=_residual_setup)


def _padded_modulated_reference(y, x, scale, weight, bias, eps):
    """The reference on maps that may be padded (``layout.py``; the scale compact), the result padded as y."""
    valid = weight.numel()
    out = modulated_layer_norm_reference(unpad_groups(y, valid), unpad_groups(x, valid), scale, weight, bias, eps)
    return pad_groups(out, y.shape[-1])


def _modulated_fwd_reference(y, x, scale, weight, bias, eps):
    with torch.no_grad():
        out = _padded_modulated_reference(y, x, scale, weight, bias, eps)
    return out.contiguous(), empty(y, torch.float32), empty(y, torch.float32)


@fused_op('mmgroupmamba::modulated_layer_norm_fwd', reference=_modulated_fwd_reference)
def modulated_layer_norm_fwd(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)`` of ``LayerNorm(y * x * scale[:, None, None, :])``; statistics as above."""
    return triton_module('triton_gated_norm', y.device).modulated_norm_forward(y, x, scale, weight, bias, eps)


@modulated_layer_norm_fwd.register_fake
def _(y, x, scale, weight, bias, eps):
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if use_triton(y):
        stats = y.new_empty((y.numel() // y.shape[-1],), dtype=torch.float32)
        return out, stats, torch.empty_like(stats)
    return out, empty(y, torch.float32), empty(y, torch.float32)


def _modulated_bwd_reference(dout, y, x, scale, weight, bias, mean, rstd, eps, need_output):
    (dy, dx, dscale, dw, db), out = reference_grads(
        lambda *t: _padded_modulated_reference(*t, eps), (y, x, scale, weight, bias), dout, need_output)
    return dy, dx, dscale, torch.stack([dw, db]).to(reduced_dtype(y)), (out if need_output else empty(y))


@fused_op('mmgroupmamba::modulated_layer_norm_bwd', reference=_modulated_bwd_reference)
def modulated_layer_norm_bwd(dout: torch.Tensor, y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                             eps: float, need_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    """``(dy, dx, dscale, dwb, out)``; ``dwb`` and ``out`` (with its ones column) as for the gated norm."""
    dy, dx, dscale, dwb, out = triton_module('triton_gated_norm', y.device).modulated_norm_backward(
        dout, y, x, scale, weight, bias, mean, rstd, need_output)
    return dy, dx, dscale, dwb, (out if need_output else empty(y))


@modulated_layer_norm_bwd.register_fake
def _(dout, y, x, scale, weight, bias, mean, rstd, eps, need_output):
    out = torch.empty(with_ones_column_shape(y.shape), dtype=y.dtype, device=y.device) if need_output else empty(y)
    return (torch.empty(y.shape, dtype=y.dtype, device=y.device), torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty_like(scale), weight.new_empty((2, *weight.shape), dtype=reduced_dtype(y)), out)


def modulated_layer_norm_grads(dout, y, x, scale, weight, bias, mean, rstd, eps, need_output):
    """:func:`modulated_layer_norm_bwd` with its outputs as the inputs' gradients: ``(dy, dx, dscale, dweight,
    dbias, out or None)``."""
    dy, dx, dscale, (dw, db), out = modulated_layer_norm_bwd(dout, y, x, scale, weight, bias, mean, rstd, eps,
                                                             need_output)
    return dy, dx, dscale, cast(dw, weight.dtype), cast(db, bias.dtype), (out if need_output else None)


def _modulated_setup(ctx, inputs, output):
    y, x, scale, weight, bias, eps = inputs
    ctx.save_for_backward(y, x, scale, weight, bias, output[1], output[2])
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: no zero fills for them in every backward


def _modulated_backward(ctx, dout, _dmean, _drstd):
    dy, dx, dscale, dw, db, _ = modulated_layer_norm_grads(dout, *ctx.saved_tensors, ctx.eps, False)
    return dy, dx, dscale, dw, db, None


modulated_layer_norm_fwd.register_autograd(_modulated_backward, setup_context=_modulated_setup)


def promoted_dtype(y, z):
    return torch.promote_types(y.dtype, z.dtype) if z is not None else y.dtype


def gated_group_norm(y, z, weight, bias, groups, eps, out_dtype=None, out_channels=None):
    """``(LayerNorm_per_group(y) * weight + bias) * silu(z)`` over the last dim (``groups`` equal groups).

    Args:
        y (Tensor): ``(..., C)`` scan output; its channels compact or padded (``kernels/layout.py``: the
            ``weight.numel()`` channels stored in 4 scan groups with zeros after each).
        z (Tensor, optional): ``(..., C)`` gate input, laid out as y; ``None``: no gate.
        weight, bias (Tensor): the groups' LayerNorm affines, concatenated (compact).
        groups (int): number of channel groups; each is normalised on its own.
        eps (float): LayerNorm epsilon.
        out_dtype (torch.dtype, optional): default: y's and z's promoted dtype.
        out_channels (int, optional): columns of the output, compact or padded (zeros in the pad channels);
            default: y's.

    Dispatch follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    return gated_group_norm_fwd(y, z, weight, bias, groups, eps, out_dtype or promoted_dtype(y, z),
                                out_channels or y.shape[-1])[0]


def layer_norm(x, weight, bias, eps, out_dtype=None, out_channels=None):
    """``F.layer_norm`` over the last dim, through the same kernels on CUDA (PyTorch's runs one thread block
    per row, slow for GroupMamba's 64..512 channels). ``x`` and the output (``out_channels`` columns, default
    x's) may be padded (``kernels/layout.py``): the statistics are over the valid channels.

    ``out_dtype`` (default: x's): under autocast the normalised map feeds fp16/bf16 matmuls, so writing it in
    that dtype saves a cast of the whole map (and keeps one copy of it for backward instead of two).
    """
    return gated_group_norm(x, None, weight, bias, 1, eps, out_dtype, out_channels)


def residual_layer_norm(x, branch, keep, weight, bias, eps, out_dtype=None, out_channels=None):
    """``(total, LayerNorm(total))`` of the residual sum ``total = x + branch * keep[:, None, None, None]``, in one
    pass: a block's residual add (``keep``: stochastic depth's per-image scale, ``(B,)`` fp32, 0 for a dropped
    branch; None where nothing drops) and the norm that reads its result next, so that the sum is not read back.

    ``x`` and ``branch`` are ``(B, H, W, C)`` maps, compact or padded (``kernels/layout.py``); ``total`` is in x's
    dtype, the normalised map in ``out_dtype`` (default x's) with ``out_channels`` columns (default x's). The
    backward adds the sum's gradient from its other readers to the norm's inside the norm's kernel.
    """
    total, out, _, _ = residual_layer_norm_fwd(x, branch, keep, weight, bias, eps, out_dtype or x.dtype,
                                               out_channels or x.shape[-1])
    return total, out


def modulated_layer_norm(y, x, scale, weight, bias, eps):
    """``LayerNorm(y * x * scale[:, None, None, :])`` over the last dim of ``(B, H, W, C)`` maps, in y's dtype.

    ``scale`` is ``(B, C)``: GroupMamba's channel affinity times its skip scale. One fused pass on CUDA, which
    keeps neither the product nor a cast of the scale for backward.
    """
    return modulated_layer_norm_fwd(y, x, scale, weight, bias, eps)[0]

"""Triton kernels: GroupMamba's channel affinity, ``skip_scale * sigmoid(fc2(relu(fc1(pooled))))`` for the
pooled map ``(B, C)``, forward in one launch and backward in one launch.

The bottleneck is tiny (``C`` = 64..512 channels, ``R = C // 16`` = 4..32 hidden units, one row per image), so
the unfused PyTorch MLP was about 22 launches per block (forward and backward) for microseconds of work, on a
step bound by its host's launches. Both weight matrices fit in one program's registers as ``(R, C)`` tiles
(``fc2``'s read transposed), and the products are broadcasts and row/column sums: no ``tl.dot``, whose tiles
would be mostly padding at these sizes. Everything is computed in fp32.

Forward: one program per image. Backward: one program for the whole batch, looping over the images, so that the
weight and bias gradients (sums over the batch) are accumulated in registers in a fixed order: deterministic,
no atomics, no partial sums to reduce in another launch. The backward recomputes the hidden units and the gate
from the inputs (a few register operations per image) instead of the forward keeping them.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .ops_util import next_power_of_2
from .reference import channel_affinity_dtype


@triton.jit
def _weight_tiles(W1, B1, W2, B2, C, R, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Channel and hidden-unit offsets with their masks, ``fc1``'s weight ``(R, C)``, ``fc2``'s transposed to
    ``(R, C)``, and both biases, in fp32 (zeros outside ``R x C``, so padded units and channels add nothing)."""
    cols = tl.arange(0, BLOCK_C)
    units = tl.arange(0, BLOCK_R)
    col_ok = cols < C
    unit_ok = units < R
    tile_ok = unit_ok[:, None] & col_ok[None, :]
    w1 = tl.load(W1 + units[:, None] * C + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    w2t = tl.load(W2 + cols[None, :] * R + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + units, mask=unit_ok, other=0.0).to(tl.float32)
    b2 = tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    return cols, units, col_ok, unit_ok, w1, w2t, b1, b2


@triton.jit
def _bottleneck(pooled, w1, b1, w2t, b2):
    """One image's pre-activation of the hidden units ``(R,)``, the hidden units, and the gate ``(C,)``."""
    pre = tl.sum(w1 * pooled[None, :], axis=1) + b1
    hidden = tl.maximum(pre, 0.0)
    gate = tl.sigmoid(tl.sum(w2t * hidden[:, None], axis=0) + b2)
    return pre, hidden, gate


@triton.jit
def _affinity_fwd_kernel(Pooled, W1, B1, W2, B2, Skip, Scale, C, R,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    image = tl.program_id(0)
    cols, units, col_ok, unit_ok, w1, w2t, b1, b2 = _weight_tiles(W1, B1, W2, B2, C, R, BLOCK_C, BLOCK_R)
    pooled = tl.load(Pooled + image * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    _, _, gate = _bottleneck(pooled, w1, b1, w2t, b2)
    skip = tl.load(Skip).to(tl.float32)
    tl.store(Scale + image * C + cols, (skip * gate).to(Scale.dtype.element_ty), mask=col_ok)


@triton.jit
def _affinity_bwd_kernel(DScale, Pooled, W1, B1, W2, B2, Skip, DPooled, DW1, DB1, DW2, DB2, DSkip, batch, C, R,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    cols, units, col_ok, unit_ok, w1, w2t, b1, b2 = _weight_tiles(W1, B1, W2, B2, C, R, BLOCK_C, BLOCK_R)
    skip = tl.load(Skip).to(tl.float32)
    dw1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dw2t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dskip = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for image in range(0, batch):
        pooled = tl.load(Pooled + image * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        pre, hidden, gate = _bottleneck(pooled, w1, b1, w2t, b2)
        dscale = tl.load(DScale + image * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        dskip += dscale * gate
        dlogit = dscale * skip * gate * (1.0 - gate)
        db2 += dlogit
        dw2t += hidden[:, None] * dlogit[None, :]
        # relu's gradient passes where its input was positive (torch's threshold_backward: output > 0)
        dpre = tl.where(pre > 0.0, tl.sum(w2t * dlogit[None, :], axis=1), 0.0)
        db1 += dpre
        dw1 += dpre[:, None] * pooled[None, :]
        dpooled = tl.sum(w1 * dpre[:, None], axis=0)
        tl.store(DPooled + image * C + cols, dpooled.to(DPooled.dtype.element_ty), mask=col_ok)
    tile_ok = unit_ok[:, None] & col_ok[None, :]
    tl.store(DW1 + units[:, None] * C + cols[None, :], dw1.to(DW1.dtype.element_ty), mask=tile_ok)
    tl.store(DW2 + cols[None, :] * R + units[:, None], dw2t.to(DW2.dtype.element_ty), mask=tile_ok)
    tl.store(DB1 + units, db1.to(DB1.dtype.element_ty), mask=unit_ok)
    tl.store(DB2 + cols, db2.to(DB2.dtype.element_ty), mask=col_ok)
    tl.store(DSkip, tl.sum(dskip, axis=0).to(DSkip.dtype.element_ty))


def _blocks(channels, units):
    """Power-of-2 tiles over the channels and hidden units, and the warps for them: the backward holds four
    ``(R, C)`` fp32 tiles (two weights, two gradient accumulators), up to 32 x 512 each; more warps keep that
    in registers (16 warps: about 128 of them per thread for the four)."""
    block_c, block_r = next_power_of_2(channels), next_power_of_2(units)
    warps = min(16, max(4, block_c * block_r // 1024))
    return block_c, block_r, warps


def affinity_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """The ``(B, C)`` scale in :func:`~mmgroupmamba.kernels.reference.channel_affinity_dtype`."""
    batch, channels = pooled.shape
    units = fc1_weight.shape[0]
    pooled = pooled.contiguous()
    scale = torch.empty((batch, channels), dtype=channel_affinity_dtype(pooled), device=pooled.device)
    block_c, block_r, warps = _blocks(channels, units)
    wrap_triton(_affinity_fwd_kernel)[(batch,)](
        pooled, fc1_weight.contiguous(), fc1_bias, fc2_weight.contiguous(), fc2_bias, skip_scale, scale,
        channels, units, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps)
    return scale


def affinity_backward(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """``(dpooled, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dskip_scale)``, each in its input's dtype
    (accumulated in fp32)."""
    batch, channels = pooled.shape
    units = fc1_weight.shape[0]
    pooled, fc1_weight, fc2_weight = pooled.contiguous(), fc1_weight.contiguous(), fc2_weight.contiguous()
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device)
             for t in (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)]
    block_c, block_r, warps = _blocks(channels, units)
    wrap_triton(_affinity_bwd_kernel)[(1,)](
        dscale.contiguous(), pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, *grads, batch,
        channels, units, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps)
    return tuple(grads)


KERNEL = _affinity_fwd_kernel  # what dispatch.kernels_interpreted inspects

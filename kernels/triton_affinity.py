"""Triton kernels: GroupMamba's channel affinity, ``skip_scale * sigmoid(fc2(relu(fc1(pooled))))`` for the
pooled map ``(B, C)``, forward in one launch and backward in two.

The bottleneck is tiny (``C`` = 64..512 channels, ``R = C // 16`` = 4..32 hidden units, one row per image), so
the unfused PyTorch MLP was 15 launches per block (forward and backward) for microseconds of work, on a
step bound by its host's launches. Both weight matrices fit in one program's registers as ``(R, C)`` tiles
(``fc2``'s read transposed), and the products are broadcasts and row/column sums: no ``tl.dot``, whose tiles
would be mostly padding at these sizes. Everything is computed in fp32.

Forward: one program per image. Backward: the images split over at most one program per multiprocessor, each
accumulating its images' weight and bias gradients in registers, then one ``sum`` of the programs' partial rows:
deterministic (fixed chunks and order, no atomics) and parallel at a classification batch, for one launch more
than a single program looping over all images would take. The backward recomputes the hidden units and the
gate from the inputs (a few register operations per image) instead of the forward keeping them.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .affinity import param_grad_sizes
from .dispatch import multiprocessors
from .ops_util import cdiv, next_power_of_2, reduced_dtype, size_hint
from .reference import channel_affinity_dtype


@triton.jit
def _tile_offsets(C, R, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Channel and hidden-unit offsets with their masks. No pointers come in (see ``triton_scan._chunk_indices``:
    a helper that gives store addresses and takes a pointer makes torch.compile copy that tensor every launch)."""
    cols = tl.arange(0, BLOCK_C)
    units = tl.arange(0, BLOCK_R)
    return cols, units, cols < C, units < R


@triton.jit
def _load_weights(W1, B1, W2, B2, cols, units, col_ok, unit_ok, C, R):
    """``fc1``'s weight ``(R, C)``, ``fc2``'s transposed to ``(R, C)``, and both biases, in fp32 (zeros outside
    ``R x C``, so padded units and channels add nothing)."""
    tile_ok = unit_ok[:, None] & col_ok[None, :]
    w1 = tl.load(W1 + units[:, None] * C + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    w2t = tl.load(W2 + cols[None, :] * R + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + units, mask=unit_ok, other=0.0).to(tl.float32)
    b2 = tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    return w1, w2t, b1, b2


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
    cols, units, col_ok, unit_ok = _tile_offsets(C, R, BLOCK_C, BLOCK_R)
    w1, w2t, b1, b2 = _load_weights(W1, B1, W2, B2, cols, units, col_ok, unit_ok, C, R)
    pooled = tl.load(Pooled + image * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    _, _, gate = _bottleneck(pooled, w1, b1, w2t, b2)
    skip = tl.load(Skip).to(tl.float32)
    tl.store(Scale + image * C + cols, (skip * gate).to(Scale.dtype.element_ty), mask=col_ok)


@triton.jit
def _affinity_bwd_kernel(DScale, Pooled, W1, B1, W2, B2, Skip, DPooled, Partials, batch, images_per_program, C, R,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per chunk of ``images_per_program`` images: their input gradients, and their sums of the
    weight, bias and skip gradients as one row of ``Partials``, laid out as ``affinity.param_grad_sizes`` says."""
    chunk = tl.program_id(0)
    cols, units, col_ok, unit_ok = _tile_offsets(C, R, BLOCK_C, BLOCK_R)
    w1, w2t, b1, b2 = _load_weights(W1, B1, W2, B2, cols, units, col_ok, unit_ok, C, R)
    skip = tl.load(Skip).to(tl.float32)
    dw1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dw2t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dskip = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = chunk * images_per_program
    for image in range(first, tl.minimum(first + images_per_program, batch)):
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
    row = Partials + chunk.to(tl.int64) * (2 * R * C + R + C + 1)
    tile_ok = unit_ok[:, None] & col_ok[None, :]
    out_ty = Partials.dtype.element_ty
    tl.store(row + units[:, None] * C + cols[None, :], dw1.to(out_ty), mask=tile_ok)
    tl.store(row + R * C + units, db1.to(out_ty), mask=unit_ok)
    tl.store(row + R * C + R + cols[None, :] * R + units[:, None], dw2t.to(out_ty), mask=tile_ok)  # fc2's (C, R)
    tl.store(row + 2 * R * C + R + cols, db2.to(out_ty), mask=col_ok)
    tl.store(row + 2 * R * C + R + C, tl.sum(dskip, axis=0).to(out_ty))


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
    """``(dpooled, dparams)``: see :func:`~mmgroupmamba.kernels.affinity.channel_affinity_bwd`.

    The images are split over at most one program per multiprocessor, each summing its images'
    weight gradients in fp32 registers; one ``sum`` over the programs' rows then gives the weights' gradients
    (deterministic: fixed chunks, fixed order). One program for the whole batch would run 128 images one after
    another at a classification batch.
    """
    batch, channels = pooled.shape
    units = fc1_weight.shape[0]
    pooled, fc1_weight, fc2_weight = pooled.contiguous(), fc1_weight.contiguous(), fc2_weight.contiguous()
    dpooled = torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device)
    # A tiling choice, from the traced example's batch where it is symbolic (the program count stays symbolic);
    # 4 "multiprocessors" in the interpreter, so that the CPU tests split batches too.
    hint = size_hint(batch)
    images_per_program = max(1, cdiv(hint, multiprocessors(pooled.device, interpreted=4)))
    programs = cdiv(batch, images_per_program)
    partials = torch.empty((programs, sum(param_grad_sizes(channels, units))), dtype=reduced_dtype(pooled),
                           device=pooled.device)
    block_c, block_r, warps = _blocks(channels, units)
    wrap_triton(_affinity_bwd_kernel)[(programs,)](
        dscale.contiguous(), pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, dpooled, partials,
        batch, images_per_program, channels, units, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps)
    return dpooled, partials.sum(0)


KERNEL = _affinity_fwd_kernel  # what dispatch.kernels_interpreted inspects

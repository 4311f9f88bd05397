"""Triton kernels: GroupMamba's channel affinity, ``skip_scale * sigmoid(fc2(relu(fc1(pooled))))`` for the
pooled map ``(B, C)``, forward in one launch and backward in two.

The bottleneck is tiny (``C`` = 64..512 channels, ``R = C // 16`` = 4..32 hidden units, one row per image), so
the unfused PyTorch MLP was 15 launches per block (forward and backward) for microseconds of work, on a
step bound by its host's launches. The products are broadcasts and row/column sums over ``(R, C)`` tiles
(``fc2``'s weight read transposed): no ``tl.dot``, whose tiles would be mostly padding at these sizes.
Everything is computed in fp32.

The pooled map comes in its stored layout (``layout.py``: each scan group of a padded stage followed by zero
channels), as the op's mean gives it, and its gradient goes back in that layout, zero in the pad channels,
already divided by the map's positions: it is the gradient of every position of the map, which the op hands
to autograd as a broadcast view (``affinity.py``), so that the mean's division costs no launch of its own. The
scale and the parameters are compact. Unpadding the map in PyTorch took three small launches a padded block
(a copy forward, a fill and a copy backward; README, forty-seventh session).

Forward: one program per image, holding both weight matrices as whole ``(R, C)`` tiles (up to 32 x 512: 128
registers a thread at 16 warps for sm_90 and no spills, ``benchmarks/kernel_registers.py``).

Backward: the images split over at most one program per multiprocessor, and each program walks the channels in
chunks of ``CHUNK_C``, never holding more than ``(R, CHUNK_C)`` of a weight or gradient. With whole tiles it held
four (two weights, two gradient accumulators) and spilled about 1.7 KB a thread at stage 3. Per image, three
passes over the chunks: ``fc1``'s pre-activation (an ``(R,)`` sum), then the gate and its gradients chunk by
chunk (summing the hidden units' gradient), then ``fc1``'s weight gradient and the pooled map's gradient. The
gradients of the program's images for both weights and ``fc2``'s bias are summed chunk by chunk in the program's
own row of the partial sums (its first image stores, later ones load, add and store), those of ``fc1``'s bias
and the skip scale in registers; then one ``sum`` over the programs' rows: deterministic (fixed chunks and
order, no atomics) and parallel at a classification batch, for one launch more than a single program looping
over all images would take. The backward recomputes the hidden units and the gate from the
inputs instead of the forward keeping them.
"""
import torch
import triton
import triton.language as tl

from .affinity import param_grad_sizes
from .dispatch import multiprocessors
from .layout import group_widths
from .ops_util import cdiv, launchable, next_power_of_2, reduced_dtype, size_hint
from .reference import channel_affinity_dtype


@triton.jit
def _channels(stored, S, V, P):
    """For offsets ``stored`` into a pooled row of ``S`` stored channels, ``V`` valid of every ``P`` (one scan
    group; ``V == P`` unpadded): the compact channel each holds and whether it holds one (not a pad channel, not
    past the row). No pointers come in (see ``triton_scan._chunk_indices``: a helper that gives store addresses
    and takes a pointer makes torch.compile copy that tensor every launch)."""
    in_group = stored % P
    return (stored // P) * V + in_group, (stored < S) & (in_group < V)


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
def _affinity_fwd_kernel(Pooled, W1, B1, W2, B2, Skip, Scale, C, R, S, V, P,
                         BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    image = tl.program_id(0)
    stored = tl.arange(0, BLOCK_S)
    cols, col_ok = _channels(stored, S, V, P)
    units = tl.arange(0, BLOCK_R)
    unit_ok = units < R
    w1, w2t, b1, b2 = _load_weights(W1, B1, W2, B2, cols, units, col_ok, unit_ok, C, R)
    pooled = tl.load(Pooled + image * S + stored, mask=col_ok, other=0.0).to(tl.float32)
    hidden = tl.maximum(tl.sum(w1 * pooled[None, :], axis=1) + b1, 0.0)  # (R,)
    gate = tl.sigmoid(tl.sum(w2t * hidden[:, None], axis=0) + b2)  # (C,)
    skip = tl.load(Skip).to(tl.float32)
    tl.store(Scale + image * C + cols, (skip * gate).to(Scale.dtype.element_ty), mask=col_ok)


# Channels a backward chunk covers: the smallest stage's width (a stage of 64 channels is one chunk). A (32, 64)
# fp32 tile is 4 values a thread at 16 warps; wider chunks bring back the register pressure of whole tiles,
# narrower ones add loop trips, each waiting on its loads.
CHUNK_C = 64


@triton.jit
def _chunk(s0, S, V, P, unit_ok, CHUNK_C: tl.constexpr):
    """The stored channels of the chunk starting at ``s0``, the compact channels they hold, which hold one, and
    the ``(R, CHUNK_C)`` tile's mask (no pointers: see :func:`_channels`)."""
    stored = s0 + tl.arange(0, CHUNK_C)
    cols, col_ok = _channels(stored, S, V, P)
    return stored, cols, col_ok, unit_ok[:, None] & col_ok[None, :]


@triton.jit
def _fc1_chunk(W1, cols, units, tile_ok, C):
    """``fc1``'s weight ``(R, CHUNK_C)`` over the chunk's channels in fp32 (zeros outside ``R x C``, so padded
    units and channels add nothing)."""
    return tl.load(W1 + units[:, None] * C + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)


@triton.jit
def _fc2t_chunk(W2, cols, units, tile_ok, R):
    """``fc2``'s weight ``(C, R)`` read transposed, ``(R, CHUNK_C)``, likewise."""
    return tl.load(W2 + cols[None, :] * R + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)


@triton.jit
def _affinity_bwd_kernel(DScale, Pooled, W1, B1, W2, B2, Skip, DPosition, Partials, batch, images_per_program,
                         positions, C, R, S, V, P, BLOCK_R: tl.constexpr, CHUNK_C: tl.constexpr):
    """One program per ``images_per_program`` images: the gradient of each of their maps' ``positions`` (the
    pooled map's divided by them; zeros in the pad channels), and their sums of the weight, bias and skip
    gradients as one row of ``Partials``, laid out as ``affinity.param_grad_sizes`` says. The stored channels in
    chunks of ``CHUNK_C``, three passes per image (the module's docstring)."""
    program = tl.program_id(0)
    units = tl.arange(0, BLOCK_R)
    unit_ok = units < R
    b1 = tl.load(B1 + units, mask=unit_ok, other=0.0).to(tl.float32)
    skip = tl.load(Skip).to(tl.float32)
    row = Partials + program.to(tl.int64) * (2 * R * C + R + C + 1)
    out_ty = Partials.dtype.element_ty
    db1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dskip = tl.zeros((CHUNK_C,), dtype=tl.float32)
    first = program * images_per_program
    for image in range(first, tl.minimum(first + images_per_program, batch)):
        # The row holds the earlier images' sums: the first image's loads are masked off (zeros), so it stores.
        later = image > first
        pre = b1
        for s0 in range(0, S, CHUNK_C):
            stored, cols, col_ok, tile_ok = _chunk(s0, S, V, P, unit_ok, CHUNK_C)
            w1 = _fc1_chunk(W1, cols, units, tile_ok, C)
            pooled = tl.load(Pooled + image * S + stored, mask=col_ok, other=0.0).to(tl.float32)
            pre += tl.sum(w1 * pooled[None, :], axis=1)
        hidden = tl.maximum(pre, 0.0)
        dpre = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s0 in range(0, S, CHUNK_C):
            stored, cols, col_ok, tile_ok = _chunk(s0, S, V, P, unit_ok, CHUNK_C)
            w2t = _fc2t_chunk(W2, cols, units, tile_ok, R)
            b2 = tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)
            gate = tl.sigmoid(tl.sum(w2t * hidden[:, None], axis=0) + b2)
            dscale = tl.load(DScale + image * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            dskip += dscale * gate
            dlogit = dscale * skip * gate * (1.0 - gate)
            dpre += tl.sum(w2t * dlogit[None, :], axis=1)
            # Stores inline, not in a helper: torch.compile would count a storing helper's every argument as
            # written, and the weights its values were loaded through (triton_scan._chunk_indices).
            db2_at = row + 2 * R * C + R + cols
            db2 = tl.load(db2_at, mask=col_ok & later, other=0.0).to(tl.float32) + dlogit
            tl.store(db2_at, db2.to(out_ty), mask=col_ok)
            dw2_at = row + R * C + R + cols[None, :] * R + units[:, None]  # fc2's (C, R)
            dw2t = tl.load(dw2_at, mask=tile_ok & later, other=0.0).to(tl.float32) + hidden[:, None] * dlogit[None, :]
            tl.store(dw2_at, dw2t.to(out_ty), mask=tile_ok)
        # relu's gradient passes where its input was positive (torch's threshold_backward: output > 0)
        dpre = tl.where(pre > 0.0, dpre, 0.0)
        db1 += dpre
        for s0 in range(0, S, CHUNK_C):
            stored, cols, col_ok, tile_ok = _chunk(s0, S, V, P, unit_ok, CHUNK_C)
            w1 = _fc1_chunk(W1, cols, units, tile_ok, C)
            pooled = tl.load(Pooled + image * S + stored, mask=col_ok, other=0.0).to(tl.float32)
            dw1_at = row + units[:, None] * C + cols[None, :]
            dw1 = tl.load(dw1_at, mask=tile_ok & later, other=0.0).to(tl.float32) + dpre[:, None] * pooled[None, :]
            tl.store(dw1_at, dw1.to(out_ty), mask=tile_ok)
            dpooled = tl.sum(w1 * dpre[:, None], axis=0)  # zero in the pad channels, whose w1 loaded as zeros
            # The mean's backward: every position of the map gets the pooled map's gradient over the positions
            # (div_rn: `/` here compiled to a division that spilled 4 bytes with two images a program, sm_90).
            dposition = tl.math.div_rn(dpooled, positions.to(tl.float32))
            tl.store(DPosition + image * S + stored, dposition.to(DPosition.dtype.element_ty), mask=stored < S)
        # The next image loads what this one stored, and a thread may load an element another thread stored
        # (replicated layouts: Triton orders global memory only within a thread, triton-lang/triton#1615): the
        # barrier makes the block's stores visible to all its threads first.
        tl.debug_barrier()
    tl.store(row + R * C + units, db1.to(out_ty), mask=unit_ok)
    tl.store(row + 2 * R * C + R + C, tl.sum(dskip, axis=0).to(out_ty))


def _blocks(stored, units):
    """Power-of-2 tiles and the warps for them, ``(block_s, block_r, forward warps, backward warps)``.

    The forward holds two whole ``(R, S)`` fp32 tiles (the weights at the stored channels), up to 32 x 512
    each: more warps keep them in registers (16 warps: 32 values of each per thread). The backward holds ``(R,
    CHUNK_C)`` tiles, a few at a time: a warp per 128 of a tile's values (at most 4 a thread, one 16-byte load),
    at least 4 warps (Triton's default; the smallest stages' tiles have 256 and 512 values), at most 16 (32 x 64
    is 16 such warps' worth). For sm_90 that compiles to 48-125 registers and no spills at GroupMamba's stages;
    32 x 64 at 4 warps (16 values a thread) took 255 registers and spilled (``benchmarks/kernel_registers.py``,
    Triton 3.8).
    """
    block_s, block_r = next_power_of_2(stored), next_power_of_2(units)
    forward_warps = min(16, max(4, block_s * block_r // 1024))
    backward_warps = min(16, max(4, block_r * CHUNK_C // 128))
    return block_s, block_r, forward_warps, backward_warps


def _layout(pooled, fc1_weight):
    """``(batch, C, S, V, P)``: the pooled map's compact and stored channels, and both per scan group (``V == P``
    where it is not padded: the channel mapping is then the identity)."""
    batch, stored = pooled.shape
    channels = fc1_weight.shape[1]
    return batch, channels, stored, *group_widths(channels, stored)


def affinity_forward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """The compact ``(B, C)`` scale in :func:`~mmgroupmamba.kernels.reference.channel_affinity_dtype`, for the
    pooled map in its stored layout."""
    batch, channels, stored, valid, pitch = _layout(pooled, fc1_weight)
    units = fc1_weight.shape[0]
    pooled = pooled.contiguous()
    scale = torch.empty((batch, channels), dtype=channel_affinity_dtype(pooled), device=pooled.device)
    block_s, block_r, warps, _ = _blocks(stored, units)
    launchable(_affinity_fwd_kernel)[(batch,)](
        pooled, fc1_weight.contiguous(), fc1_bias, fc2_weight.contiguous(), fc2_bias, skip_scale, scale,
        channels, units, stored, valid, pitch, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=warps)
    return scale


def affinity_backward(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, positions):
    """``(dposition, dparams)``: see :func:`~mmgroupmamba.kernels.affinity.channel_affinity_bwd`.

    The images are split over at most one program per multiprocessor, each summing its images' weight
    gradients (in fp32) in its own row of ``partials``; one ``sum`` over the programs' rows then gives the
    weights' gradients (deterministic: fixed chunks, fixed order). One program for the whole batch would run 128
    images one after another at a classification batch.
    """
    batch, channels, stored, valid, pitch = _layout(pooled, fc1_weight)
    units = fc1_weight.shape[0]
    pooled, fc1_weight, fc2_weight = pooled.contiguous(), fc1_weight.contiguous(), fc2_weight.contiguous()
    dposition = torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device)
    # A tiling choice, from the traced example's batch where it is symbolic (the program count stays symbolic);
    # 4 "multiprocessors" in the interpreter, so that the CPU tests split batches too.
    hint = size_hint(batch)
    images_per_program = max(1, cdiv(hint, multiprocessors(pooled.device, interpreted=4)))
    programs = cdiv(batch, images_per_program)
    partials = torch.empty((programs, sum(param_grad_sizes(channels, units))), dtype=reduced_dtype(pooled),
                           device=pooled.device)
    _, block_r, _, warps = _blocks(stored, units)
    launchable(_affinity_bwd_kernel)[(programs,)](
        dscale.contiguous(), pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, dposition, partials,
        batch, images_per_program, positions, channels, units, stored, valid, pitch, BLOCK_R=block_r,
        CHUNK_C=CHUNK_C, num_warps=warps)
    return dposition, partials.sum(0)


KERNEL = _affinity_fwd_kernel  # what dispatch.kernels_interpreted inspects

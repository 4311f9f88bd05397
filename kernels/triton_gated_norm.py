"""Triton kernels: per-group LayerNorm of the scan output, its affine, and the SiLU gate, in one pass.

Without the gate (and with one group) the same kernels are the LayerNorm of the layer and of the FFN input.

``out = (LayerNorm_over_group(y) * weight + bias) * silu(z)`` for rows of ``C = groups * D`` channels. PyTorch
runs the per-group LayerNorm as a LayerNorm over rows of ``D`` channels (16..128 here): one thread block per
tiny row, which profiled as the largest GPU cost of a GroupMamba training step (kernels/README.md). Here a
program normalises a tile of ``BLOCK_N`` rows of one group (or of ``GROUPS_PER_PROGRAM`` groups; the grid's
second axis enumerates the rest), applies the affine and the gate, and keeps per-row statistics for a backward
that recomputes everything else. Weight and bias gradients are per-program partial sums reduced afterwards in
a fixed order: deterministic, no atomics. A backward program walks up to 4 consecutive row tiles (fewer where
that would leave under about 4 programs per multiprocessor), summing in registers and storing once: one partial
sum per tile was, at the widest stages, as many bytes as the gradient maps themselves.

The modulated variant normalises ``y * x * scale`` (scale per image and channel) over all channels: the
layer's channel-affinity modulation and its output LayerNorm, in one pass and without keeping the product.
"""
import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors
from .layout import GROUPS, group_widths
from .ops_util import ONES_COLUMNS, cast, cdiv, launchable, next_power_of_2, size_hint, with_ones_column_shape


@triton.jit
def _row_tile(tile, N, col_ok, BLOCK_N: tl.constexpr):
    """The BLOCK_N rows of row tile ``tile`` and their mask, the tile's mask with the columns' ``col_ok``, and
    the rows as int64 for addresses."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    return rows, row_ok, row_ok[:, None] & col_ok[None, :], rows.to(tl.int64)[:, None]


@triton.jit
def _store_ones_column(pad, row_ok, PAD: tl.constexpr):
    """The ``PAD`` columns after a recomputed output's own (``ops_util.with_ones_column``): a one, then zeros.
    ``pad``: each row's first such column, ``(rows, 1)`` pointers; ``row_ok`` the rows' ``(rows, 1)`` mask."""
    cols = tl.arange(0, PAD)[None, :]
    tl.store(pad + cols, tl.where(cols == 0, 1.0, 0.0).to(pad.dtype.element_ty), mask=row_ok)


@triton.jit
def _normalize(v, mask, W, Bias, cols, col_ok, n, eps):
    """LayerNorm of the rows of ``v`` over its ``n`` valid columns, then the affine; with row mean and rstd.
    Invalid columns (``mask`` false, pad channels included) come out 0."""
    mean = tl.sum(v, axis=1) / n
    centred = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _layout(g, offs, D, PERIOD: tl.constexpr, VALID: tl.constexpr, P_IN: tl.constexpr,
            P_OUT: tl.constexpr):
    """Columns of iteration index ``offs`` of normalisation group ``g`` (``kernels/layout.py``).

    The iteration runs over ``D`` columns a group, in scan groups of ``PERIOD``, of which the first ``VALID``
    are channels; the input stores a scan group in ``P_IN`` columns and the output in ``P_OUT`` (each
    ``PERIOD`` or ``VALID``: padded or compact). Returns the channel index (affine, statistics), whether the
    column is a channel, and the input's and output's columns with whether each exists there. Unpadded, all
    four periods are ``D`` and every column is ``g * D + offs``."""
    it = g * D + offs
    chunk = it // PERIOD
    within = it % PERIOD
    in_range = offs < D
    return (chunk * VALID + within, in_range & (within < VALID), chunk * P_IN + within,
            in_range & (within < P_IN), chunk * P_OUT + within, in_range & (within < P_OUT))


@triton.jit
def _gated_norm_fwd_kernel(Y, Z, W, Bias, Out, Mean, Rstd, Keep, Total, N, HW, stride_y, stride_z, stride_o,
                           stride_t, eps, GROUPS: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr, D: tl.constexpr,
                           PERIOD: tl.constexpr, VALID: tl.constexpr, P_IN: tl.constexpr, P_OUT: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr,
                           RESIDUAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    """``RESIDUAL``: Z is a residual branch instead of a gate: the rows normalised are ``Y + Z * Keep[image]``
    (``HW`` rows an image; ``Y + Z`` without ``HAS_KEEP``), rounded to Total's dtype and stored there."""
    offs = tl.arange(0, BLOCK_D)
    for i in tl.static_range(GROUPS_PER_PROGRAM):
        g = tl.program_id(1) * GROUPS_PER_PROGRAM + i
        cols, valid, in_cols, in_ok, out_cols, out_ok = _layout(g, offs, D, PERIOD, VALID, P_IN, P_OUT)
        rows, row_ok, mask, rows64 = _row_tile(tl.program_id(0), N, valid, BLOCK_N)
        y = tl.load(Y + rows64 * stride_y + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            branch = tl.load(Z + rows64 * stride_z + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_KEEP:
                branch = branch * tl.load(Keep + rows // HW, mask=row_ok, other=0.0)[:, None]
            # Normalised as stored, so that the backward, which reads Total, sees the forward's rows.
            total = (y + branch).to(Total.dtype.element_ty)
            tl.store(Total + rows64 * stride_t + in_cols[None, :], total, mask=row_ok[:, None] & in_ok[None, :])
            y = total.to(tl.float32)
        out, mean, rstd = _normalize(y, mask, W, Bias, cols, valid, (D // PERIOD) * VALID, eps)
        if GATED:
            z = tl.load(Z + rows64 * stride_z + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out = out * z * tl.sigmoid(z)
        tl.store(Out + rows64 * stride_o + out_cols[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & out_ok[None, :])
        tl.store(Mean + rows * GROUPS + g, mean, mask=row_ok)
        tl.store(Rstd + rows * GROUPS + g, rstd, mask=row_ok)


# A loop count, not a size: one compiled kernel for every value.
@triton.jit(do_not_specialize=['tiles_per_program'])
def _gated_norm_bwd_kernel(DOut, Y, Z, W, Bias, Mean, Rstd, DY, DZ, DWBPart, Out, DTotal, Keep, N, HW,
                           tiles_per_program, stride_do, stride_y, stride_z, stride_dy, stride_dz, stride_o,
                           stride_dt, C, part_stride, out_width, GROUPS: tl.constexpr,
                           GROUPS_PER_PROGRAM: tl.constexpr, D: tl.constexpr, PERIOD: tl.constexpr,
                           VALID: tl.constexpr, P_IN: tl.constexpr, P_OUT: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, GATED: tl.constexpr, STORE_OUT: tl.constexpr,
                           ADD_DTOTAL: tl.constexpr, HAS_KEEP: tl.constexpr, PAD: tl.constexpr):
    """Row tiles ``[pid * tiles_per_program, (pid + 1) * tiles_per_program)`` (fewer in the last program), in
    order; the group's columns of the weight and bias partial sums are this program's own. Pad columns of the
    input's gradients get zeros, of the recomputed output too; the last group's programs also write the output's
    ones column (``PAD`` columns from ``out_width``).

    For the residual form (the forward's ``RESIDUAL``; Y is the stored sum): ``ADD_DTOTAL`` adds the sum's
    gradient from its other readers, DTotal, to the norm's before storing DY (the skip input's gradient), and
    ``HAS_KEEP`` stores the branch's, ``DY * Keep[image]``, in DZ."""
    pid = tl.program_id(0)
    first = pid * tiles_per_program
    end = tl.minimum(first + tiles_per_program, tl.cdiv(N, BLOCK_N))
    offs = tl.arange(0, BLOCK_D)
    n_valid = (D // PERIOD) * VALID
    for i in tl.static_range(GROUPS_PER_PROGRAM):
        g = tl.program_id(1) * GROUPS_PER_PROGRAM + i
        cols, valid, in_cols, in_ok, out_cols, out_ok = _layout(g, offs, D, PERIOD, VALID, P_IN, P_OUT)
        w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        if GATED or STORE_OUT:
            b = tl.load(Bias + cols, mask=valid, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_D], dtype=tl.float32)
        for tile in tl.range(first, end):
            rows, row_ok, mask, rows64 = _row_tile(tile, N, valid, BLOCK_N)
            in_mask = row_ok[:, None] & in_ok[None, :]
            y = tl.load(Y + rows64 * stride_y + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(DOut + rows64 * stride_do + out_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows * GROUPS + g, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows * GROUPS + g, mask=row_ok, other=0.0)
            y_hat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
            if GATED or STORE_OUT:
                normed = y_hat * w[None, :] + b[None, :]
            if GATED:
                z = tl.load(Z + rows64 * stride_z + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                d_normed = tl.where(mask, dout * z * sig, 0.0)
                # d silu(z)/dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                dz = dout * normed * sig * (1.0 + z * (1.0 - sig))
                tl.store(DZ + rows64 * stride_dz + in_cols[None, :], dz.to(DZ.dtype.element_ty), mask=in_mask)
                if STORE_OUT:
                    normed = normed * z * sig
            else:
                d_normed = tl.where(mask, dout, 0.0)
            if STORE_OUT:  # the forward's output, recomputed for a following linear layer's weight gradient
                tl.store(Out + rows64 * stride_o + out_cols[None, :], normed.to(Out.dtype.element_ty),
                         mask=row_ok[:, None] & out_ok[None, :])
                if g == GROUPS - 1:
                    _store_ones_column(Out + rows64 * stride_o + out_width, row_ok[:, None], PAD)
            dy_hat = d_normed * w[None, :]
            mean_dy_hat = tl.sum(dy_hat, axis=1) / n_valid
            mean_dy_hat_y_hat = tl.sum(dy_hat * y_hat, axis=1) / n_valid
            dy = tl.where(mask, (dy_hat - mean_dy_hat[:, None] - y_hat * mean_dy_hat_y_hat[:, None]) * rstd[:, None],
                          0.0)
            if ADD_DTOTAL:
                dy += tl.load(DTotal + rows64 * stride_dt + in_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + rows64 * stride_dy + in_cols[None, :], dy.to(DY.dtype.element_ty), mask=in_mask)
            if HAS_KEEP:
                keep = tl.load(Keep + rows // HW, mask=row_ok, other=0.0)
                tl.store(DZ + rows64 * stride_dz + in_cols[None, :], (dy * keep[:, None]).to(DZ.dtype.element_ty),
                         mask=in_mask)
            dw += tl.sum(d_normed * y_hat, axis=0)
            db += tl.sum(d_normed, axis=0)
        # DWBPart is (2, C, programs): the weight's partial sums, then the bias's, part_stride apart; each
        # channel's programs side by side ("Partial sums' layout" below).
        # (As pointers: the same offsets as integers first made ptxas spill 8 bytes at 64 channels.)
        part = DWBPart + pid + cols * tl.num_programs(0)
        tl.store(part, dw, mask=valid)
        tl.store(part + part_stride, db, mask=valid)


# Elements of a tile: 2048, 16 a thread in 4 warps, one group a program. ptxas for sm_90 (Triton 3.8,
# benchmarks/kernel_registers.py) put the earlier tiles (4096 elements, all groups in one program) at 255
# registers with spills in most backward kernels: the gated norm's at stages 2 and 3 (groups of 32 and 87
# channels) 1.7-1.9 KB of spill stores a thread, the modulated norm's at 64 and 128 channels ~0.5 KB; the
# compiled detection step's stage-3 gated norm took 8x the time of the stage's LayerNorm of the same size.
# These tiles need 40-255 registers (the backward's walk over several row tiles up to 255, at 128 channels) and
# spill nothing. Timed on the H200 (benchmarks/norm_kernels.py --sweep; kernels/README.md).
TILE_ELEMENTS = 2048


def _tiles(group_dims, block_n=None, num_warps=None, groups_per_program=1):
    """``(block_n, block_d, num_warps)``: rows of a tile, its padded group width, warps; either can be forced. By
    default a program's tile holds ``TILE_ELEMENTS`` elements however many groups it takes: the H100 sweep of the
    twenty-ninth session timed four stage-1 groups a program at 128 rows (8192 elements) 1.8x slower forward than
    at 32 rows (kernels/README.md, "The norm kernels timed")."""
    block_d = next_power_of_2(group_dims)
    if block_n is None:
        block_n = max(1, min(128, TILE_ELEMENTS // (block_d * groups_per_program)))
    return block_n, block_d, num_warps or 4


# The narrowest piece of a row one program normalises by default. Groups of 16 channels (GroupMamba's stage 1)
# are 32-byte row pieces: one group a program ran the H200's stage-1 gated norm at 29-37 % of copy bandwidth, all
# four groups of a row in one program at about twice that (kernels/README.md, "The norm kernels timed").
MIN_PROGRAM_CHANNELS = 64


def _group_tiles(groups, group_dims, groups_per_program):
    """``(groups_per_program, programs along the grid's second axis)``. By default a program takes the fewest
    groups that cover ``MIN_PROGRAM_CHANNELS`` of a row (one group of 64 or more channels: groups unrolled in
    one program add up their registers, and at stage 3's 87 channels one group a program timed faster)."""
    if groups_per_program is None:
        groups_per_program = next(p for p in range(1, groups + 1)
                                  if groups % p == 0 and (p * group_dims >= MIN_PROGRAM_CHANNELS or p == groups))
    if groups % groups_per_program:
        raise ValueError(f'groups_per_program={groups_per_program} must divide groups={groups}')
    return groups_per_program, groups // groups_per_program


# Partial sums' layout. The backward kernels store their per-program partial sums of the weight (bias, scale)
# gradients programs innermost, (..., C, programs), so that the sum over the programs is an inner reduction:
# torch.compile makes one kernel of it. Over the outer dimension of (programs, C), with more than 128 programs
# and fewer than 8448 channels, Inductor splits the sum into two launches
# (torch._inductor.choices.reduction_split_factor), and the compiled step is bound by its launches. The price:
# a program's C partials are stored `programs` elements apart (a few KB of scattered stores a launch).


# The longest backward walk. H200 sweep (benchmarks/norm_kernels.py --sweep, eleventh session): 4 row tiles a
# program were faster than 1 at the wide stages and no slower than 16 at any swept shape, often faster; the
# fill-the-card rule alone gave 23 at stage 1.
MAX_TILES_PER_PROGRAM = 4


def _backward_walk(n_tiles, other_programs, device, tiles_per_program):
    """``(tiles_per_program, programs)`` of a backward walking ``n_tiles`` row tiles beside ``other_programs``
    on the grid's other axis: ``tiles_per_program`` forced, or the most (up to ``MAX_TILES_PER_PROGRAM``) that
    still leave about 4 programs per multiprocessor in all (4 "multiprocessors" in the interpreter, so that the
    CPU tests walk several tiles a program and sum several programs' partials). A tiling choice, from the
    traced example's sizes where they are symbolic; the program count stays symbolic."""
    if tiles_per_program is None:
        wanted = max(1, 4 * multiprocessors(device, interpreted=4) // size_hint(other_programs))
        tiles_per_program = max(1, min(MAX_TILES_PER_PROGRAM, size_hint(n_tiles) // wanted))
    return tiles_per_program, cdiv(n_tiles, tiles_per_program)


def _rows(t, channels):
    """A 2-D ``(rows, channels)`` view with unit channel stride (a copy only if that is impossible)."""
    t2 = t.reshape(-1, channels)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _layout_meta(valid, in_channels, out_channels, groups):
    """The kernels' layout constants (``D``, ``PERIOD``, ``VALID``, ``P_IN``, ``P_OUT``: see ``_layout``) for
    ``valid`` channels read from rows of ``in_channels`` and written as ``out_channels``, each the valid count
    (compact) or its padded width (``kernels/layout.py``), normalised in ``groups`` groups."""
    if in_channels == out_channels == valid:
        d = valid // groups
        return dict(D=d, PERIOD=d, VALID=d, P_IN=d, P_OUT=d)
    stored = max(in_channels, out_channels)
    v, p = group_widths(valid, stored)
    for channels in (in_channels, out_channels):
        if channels not in (valid, stored):
            raise ValueError(f'a norm over {valid} channels reads and writes {valid} or {stored} columns, '
                             f'got {channels}')
    if GROUPS % groups:
        raise ValueError(f'a padded map normalises in groups that divide its {GROUPS} scan groups, got {groups}')
    return dict(D=GROUPS * p // groups, PERIOD=p, VALID=v, P_IN=in_channels // GROUPS,
                P_OUT=out_channels // GROUPS)


def gated_norm_forward(y, z, weight, bias, groups, eps, out_dtype, out_channels=None, block_n=None, num_warps=None,
                       groups_per_program=None):
    """``(out, mean, rstd)``: the gated per-group LayerNorm of ``y`` (``z=None``: no gate) in ``out_dtype``,
    and the per-row, per-group statistics its backward reads. ``y`` and ``z`` hold the ``weight.numel()``
    channels compact or padded (``kernels/layout.py``); ``out`` has ``out_channels`` columns (default: y's),
    zeros in its pad channels. ``block_n``, ``num_warps`` and ``groups_per_program`` force the tiling
    (``benchmarks/norm_kernels.py --sweep``)."""
    out, _, mean, rstd = _norm_forward(y, z, weight, bias, groups, eps, out_dtype, out_channels, block_n, num_warps,
                                       groups_per_program)
    return out, mean, rstd


def residual_norm_forward(x, branch, keep, weight, bias, eps, out_dtype, out_channels=None, block_n=None,
                          num_warps=None):
    """``(out, total, mean, rstd)``: ``total = x + branch * keep[:, None, None, None]`` (a residual add with
    stochastic depth's per-image scale ``keep``, ``(B,)`` fp32; None: ``x + branch``) in x's dtype, and ``out``
    the LayerNorm of ``total`` as :func:`gated_norm_forward` gives it (one group, no gate), from one read of the
    two maps ``(B, H, W, C)``, compact or padded."""
    return _norm_forward(x, branch, weight, bias, 1, eps, out_dtype, out_channels, block_n, num_warps, None,
                         residual=True, keep=keep)


def _norm_forward(y, z, weight, bias, groups, eps, out_dtype, out_channels, block_n, num_warps, groups_per_program,
                  residual=False, keep=None):
    channels = y.shape[-1]
    out_channels = out_channels or channels
    y2 = _rows(y, channels)
    z2 = _rows(z, channels) if z is not None else y2
    n = y2.shape[0]
    out = torch.empty((n, out_channels), dtype=out_dtype, device=y.device)
    mean = torch.empty((n, groups), dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    total = torch.empty((n, channels), dtype=y.dtype, device=y.device) if residual else out
    layout = _layout_meta(weight.numel(), channels, out_channels, groups)
    per_program, group_programs = _group_tiles(groups, layout['D'], groups_per_program)
    block_n, block_d, num_warps = _tiles(layout['D'], block_n, num_warps, per_program)
    launchable(_gated_norm_fwd_kernel)[(cdiv(n, block_n), group_programs)](
        y2, z2, weight, bias, out, mean, rstd, mean if keep is None else keep, total, n,
        _rows_per_image(y) if residual else n, y2.stride(0), z2.stride(0), out.stride(0), total.stride(0), eps,
        GROUPS=groups, GROUPS_PER_PROGRAM=per_program, **layout, BLOCK_N=block_n, BLOCK_D=block_d,
        GATED=z is not None and not residual, RESIDUAL=residual, HAS_KEEP=keep is not None, num_warps=num_warps)
    return (out.view(*y.shape[:-1], out_channels), (total.view(y.shape) if residual else None), mean, rstd)


def _rows_per_image(t):
    """Rows of one image of a ``(B, H, W, C)`` map (``H * W``), which a per-image scale is indexed by."""
    return t.numel() // (t.shape[0] * t.shape[-1])


def gated_norm_backward(dout, y, z, weight, bias, mean, rstd, groups, out_dtype, need_output, block_n=None,
                        num_warps=None, groups_per_program=None, tiles_per_program=None):
    """``(dy, dz or None, dwb, out or None)``: ``dwb`` the fp32 ``(2, C)`` weight and bias gradients, ``out``
    the recomputed forward output (dout's columns); tiling as in :func:`gated_norm_forward`, and
    ``tiles_per_program`` forces the row tiles each program walks."""
    return _norm_backward(dout, y, z, weight, bias, mean, rstd, groups, out_dtype, need_output, block_n, num_warps,
                          groups_per_program, tiles_per_program)


def residual_norm_backward(dout, dtotal, total, keep, weight, bias, mean, rstd, branch_dtype, out_dtype, need_output,
                           block_n=None, num_warps=None, tiles_per_program=None):
    """``(dx, dbranch or None, dwb, out or None)`` of :func:`residual_norm_forward` from its saved ``total``:
    ``dx`` the gradient of the skip input x (the norm's plus ``dtotal``, the sum's gradient from its other
    readers; None: none), ``dbranch`` the branch's, ``dx * keep`` in ``branch_dtype`` (None without ``keep``:
    ``dx`` itself is then the branch's gradient); ``dwb`` and ``out`` as in :func:`gated_norm_backward`."""
    return _norm_backward(dout, total, None, weight, bias, mean, rstd, 1, out_dtype, need_output, block_n, num_warps,
                          None, tiles_per_program, residual=True, dtotal=dtotal, keep=keep, branch_dtype=branch_dtype)


def _norm_backward(dout, y, z, weight, bias, mean, rstd, groups, out_dtype, need_output, block_n, num_warps,
                   groups_per_program, tiles_per_program, residual=False, dtotal=None, keep=None, branch_dtype=None):
    shape, channels, out_channels = y.shape, y.shape[-1], dout.shape[-1]
    gated = z is not None
    y2 = _rows(y, channels)
    z2 = _rows(z, channels) if gated else y2
    n = y2.shape[0]
    dout2 = _rows(dout, out_channels)
    dtotal2 = _rows(dtotal, channels) if dtotal is not None else y2
    dy = torch.empty((n, channels), dtype=y.dtype, device=y.device)
    if gated or keep is not None:
        dz = torch.empty((n, channels), dtype=z.dtype if gated else branch_dtype, device=y.device)
    else:
        dz = dy
    # The recomputed output comes with its ones column (ops_util.with_ones_column), written by the kernel.
    out = torch.empty((n, out_channels + ONES_COLUMNS), dtype=out_dtype, device=y.device) if need_output else dy
    valid = weight.numel()
    layout = _layout_meta(valid, channels, out_channels, groups)
    per_program, group_programs = _group_tiles(groups, layout['D'], groups_per_program)
    block_n, block_d, num_warps = _tiles(layout['D'], block_n, num_warps, per_program)
    if per_program > 1 and tiles_per_program is None:
        # Several groups a program walked slower than one tile a program (H200 sweep, kernels/README.md).
        tiles_per_program = 1
    tiles_per_program, programs = _backward_walk(cdiv(n, block_n), group_programs, y.device, tiles_per_program)
    # Weight and bias partial sums in one buffer, one reduction for both. The kernel gets the buffer itself, not
    # views of it: torch.compile would clone each view and scatter it back (kernels/README.md, "What a compiled
    # graph copies"). Programs innermost ("Partial sums' layout" above).
    dwb_part = torch.empty((2, valid, programs), dtype=torch.float32, device=y.device)
    launchable(_gated_norm_bwd_kernel)[(programs, group_programs)](
        dout2, y2, z2, weight, bias, mean, rstd, dy, dz, dwb_part, out, dtotal2, mean if keep is None else keep, n,
        _rows_per_image(y) if residual else n, tiles_per_program, dout2.stride(0), y2.stride(0), z2.stride(0),
        dy.stride(0), dz.stride(0), out.stride(0), dtotal2.stride(0), valid, dwb_part.stride(0), out_channels,
        GROUPS=groups, GROUPS_PER_PROGRAM=per_program, **layout, BLOCK_N=block_n, BLOCK_D=block_d, GATED=gated,
        STORE_OUT=need_output, ADD_DTOTAL=dtotal is not None, HAS_KEEP=keep is not None, PAD=ONES_COLUMNS,
        num_warps=num_warps)
    return (dy.view(shape), (dz.view(shape) if dz is not dy else None), dwb_part.sum(2),
            (out.view(with_ones_column_shape((*shape[:-1], out_channels))) if need_output else None))


@triton.jit
def _image_row_tile(tile, image, HW, col_ok, BLOCK_N: tl.constexpr):
    """Row tile ``tile`` of image ``image`` only, so per-image sums never straddle two images: its rows' global
    indices (int64), their mask, and the tile's mask with the columns' ``col_ok``."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < HW
    return image.to(tl.int64) * HW + rows, row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _modulated_norm_fwd_kernel(Y, X, S, W, Bias, Out, Mean, Rstd, HW, C, C_VALID, eps, PERIOD: tl.constexpr,
                               VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of ``C`` columns (``C_VALID`` channels, padded as ``PERIOD``/``VALID`` say; the scale compact)."""
    image = tl.program_id(1)  # grid: tiles x images
    cols, col_ok, cols_in, _, _, in_ok = _layout(0, tl.arange(0, BLOCK_C), C, PERIOD, VALID, PERIOD, PERIOD)
    grow, row_ok, mask = _image_row_tile(tl.program_id(0), image, HW, col_ok, BLOCK_N)
    offs = grow[:, None] * C + cols_in[None, :]
    scale = tl.load(S + image * C_VALID + cols, mask=col_ok, other=0.0).to(tl.float32)
    m = (tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(X + offs, mask=mask, other=0.0)
         .to(tl.float32) * scale[None, :])
    out, mean, rstd = _normalize(m, mask, W, Bias, cols, col_ok, C_VALID, eps)
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & in_ok[None, :])
    tl.store(Mean + grow, mean, mask=row_ok)
    tl.store(Rstd + grow, rstd, mask=row_ok)


@triton.jit(do_not_specialize=['tiles_per_program'])  # as _gated_norm_bwd_kernel
def _modulated_norm_bwd_kernel(DOut, Y, X, S, W, Bias, Mean, Rstd, DY, DX, Parts, Out, HW, C, C_VALID,
                               tiles_per_program, part_stride, PERIOD: tl.constexpr, VALID: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, STORE_OUT: tl.constexpr,
                               PAD: tl.constexpr):
    """Image ``image``'s row tiles ``[pid * tiles_per_program, (pid + 1) * tiles_per_program)`` (fewer in the
    image's last program), in order (grid: programs per image x images). The recomputed output's rows are
    ``C + PAD`` wide: its own columns, then its ones column."""
    pid, image = tl.program_id(0), tl.program_id(1)
    first = pid * tiles_per_program
    end = tl.minimum(first + tiles_per_program, tl.cdiv(HW, BLOCK_N))
    cols, col_ok, cols_in, _, _, in_ok = _layout(0, tl.arange(0, BLOCK_C), C, PERIOD, VALID, PERIOD, PERIOD)
    scale = tl.load(S + image * C_VALID + cols, mask=col_ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if STORE_OUT:
        b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in tl.range(first, end):
        grow, row_ok, mask = _image_row_tile(tile, image, HW, col_ok, BLOCK_N)
        store_mask = row_ok[:, None] & in_ok[None, :]  # pad columns included: they get zeros
        offs = grow[:, None] * C + cols_in[None, :]
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + grow, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + grow, mask=row_ok, other=0.0)
        m_hat = tl.where(mask, (y * x * scale[None, :] - mean[:, None]) * rstd[:, None], 0.0)
        dm_hat = dout * w[None, :]
        dm = tl.where(mask, (dm_hat - (tl.sum(dm_hat, axis=1) / C_VALID)[:, None]
                             - m_hat * (tl.sum(dm_hat * m_hat, axis=1) / C_VALID)[:, None]) * rstd[:, None], 0.0)
        tl.store(DY + offs, (dm * x * scale[None, :]).to(DY.dtype.element_ty), mask=store_mask)
        tl.store(DX + offs, (dm * y * scale[None, :]).to(DX.dtype.element_ty), mask=store_mask)
        dscale += tl.sum(dm * y * x, axis=0)
        dw += tl.sum(dout * m_hat, axis=0)
        db += tl.sum(dout, axis=0)
        if STORE_OUT:  # the forward's output, recomputed for a following linear layer's weight gradient
            # Its rows are C + PAD wide. Through a block pointer: a second tile of addresses beside the map's made
            # the kernel spill at 64 or 128 channels, whatever the order or the offsets' width (ptxas, sm_90).
            # The pad channels' values are zeros themselves (m_hat, w and b are 0 there).
            out_block = tl.make_block_ptr(Out, ((image + 1) * HW, C), (C + PAD, 1), (image * HW + tile * BLOCK_N, 0),
                                          (BLOCK_N, BLOCK_C), (1, 0))
            tl.store(out_block, (m_hat * w[None, :] + b[None, :]).to(Out.dtype.element_ty), boundary_check=(0, 1))
    if STORE_OUT:
        # The output's ones columns in a walk of their own: inside the loop above they cost the tile's
        # registers (at 64 channels, spills).
        for tile in tl.range(first, end):
            pad_rows, pad_ok, _tile_mask = _image_row_tile(tile, image, HW, col_ok, BLOCK_N)
            _store_ones_column(Out + pad_rows[:, None] * (C + PAD) + C, pad_ok[:, None], PAD)
    # Parts is (3, batch, C, programs per image): the scale's, the weight's and the bias's partial sums,
    # part_stride apart.
    part = (image * C_VALID + cols) * tl.num_programs(0) + pid
    tl.store(Parts + part, dscale, mask=col_ok)
    tl.store(Parts + part_stride + part, dw, mask=col_ok)
    tl.store(Parts + 2 * part_stride + part, db, mask=col_ok)


def _modulated_layout(channels, valid):
    """``(PERIOD, VALID)`` of rows of ``channels`` columns holding ``valid`` channels (``_layout``)."""
    if channels == valid:
        return dict(PERIOD=channels, VALID=channels)
    v, p = group_widths(valid, channels)
    return dict(PERIOD=p, VALID=v)


def modulated_norm_forward(y, x, scale, weight, bias, eps, block_n=None, num_warps=None):
    """``(out, mean, rstd)`` of ``LayerNorm(y * x * scale[:, None, None, :])`` for ``(B, H, W, C)`` maps and
    ``scale`` ``(B, C)``, in y's dtype; ``block_n`` and ``num_warps`` force the tiling. The maps may be padded
    (``kernels/layout.py``: ``weight.numel()`` channels stored as ``C``; ``scale`` compact), ``out`` then too."""
    batch, height, width, channels = y.shape
    valid = weight.numel()
    hw = height * width
    y, x, scale = y.contiguous(), x.contiguous(), scale.contiguous()
    out = torch.empty_like(y)
    mean = torch.empty((batch * hw,), dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    block_n, block_c, num_warps = _tiles(channels, block_n, num_warps)
    launchable(_modulated_norm_fwd_kernel)[(cdiv(hw, block_n), batch)](
        y, x, scale, weight, bias, out, mean, rstd, hw, channels, valid, eps, **_modulated_layout(channels, valid),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return out, mean, rstd


def modulated_norm_backward(dout, y, x, scale, weight, bias, mean, rstd, need_output, block_n=None, num_warps=None,
                            tiles_per_program=None):
    """``(dy, dx, dscale, dwb, out or None)``: ``dwb`` the fp32 ``(2, C)`` weight and bias gradients, ``out``
    the recomputed forward output; tiling as in :func:`modulated_norm_forward`, and ``tiles_per_program``
    forces the row tiles each program walks (within one image: the scale gradient is per image)."""
    batch, height, width, channels = y.shape
    valid = weight.numel()
    hw = height * width
    y, x, scale = y.contiguous(), x.contiguous(), scale.contiguous()
    block_n, block_c, num_warps = _tiles(channels, block_n, num_warps)
    tiles_per_program, programs_per_image = _backward_walk(cdiv(hw, block_n), batch, y.device, tiles_per_program)
    dy, dx = torch.empty_like(y), torch.empty_like(x)
    out = torch.empty(with_ones_column_shape(y.shape), dtype=y.dtype, device=y.device) if need_output else dy
    # Scale, weight and bias partial sums (per image and program) in one buffer, given to the kernel whole (as in
    # gated_norm_backward), programs innermost ("Partial sums' layout"): one reduction over the programs, then the
    # weight's and bias's over the images.
    parts = torch.empty((3, batch, valid, programs_per_image), dtype=torch.float32, device=y.device)
    launchable(_modulated_norm_bwd_kernel)[(programs_per_image, batch)](
        dout.contiguous(), y, x, scale, weight, bias, mean, rstd, dy, dx, parts, out,
        hw, channels, valid, tiles_per_program, parts.stride(0), **_modulated_layout(channels, valid),
        BLOCK_N=block_n, BLOCK_C=block_c, STORE_OUT=need_output, PAD=ONES_COLUMNS, num_warps=num_warps)
    per_image = parts.sum(3)
    return dy, dx, cast(per_image[0], scale.dtype), per_image[1:].sum(1), (out if need_output else None)


KERNEL = _gated_norm_fwd_kernel  # what dispatch.kernels_interpreted inspects

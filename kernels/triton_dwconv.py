"""Triton kernels: 3x3 depthwise conv + bias + activation (SiLU or exact GELU) of channels-last maps.

GroupMamba runs ``act(dwconv3x3(x) + bias)`` twice a block (SiLU in the Mamba layer, GELU in the FFN). In
PyTorch that is a permute, cuDNN's depthwise conv, a permute back and the activation: several launches
forward and more backward, and the training step is bound by launches on the host. Here the forward is one
launch, the backward two plus one reduction.

**Tiling.** A program owns ``BLOCK_C`` channels of ``BLOCK_W`` consecutive columns of ``rows`` consecutive
rows of one image, and walks down its rows: each input row is loaded once as three horizontally shifted
``(BLOCK_W, BLOCK_C)`` tiles (columns ``w-1, w, w+1``; the shifted loads hit the cache lines of the centre
one), so a program reads ``rows + 2`` input rows for ``rows`` output rows. Channels are the contiguous axis:
a tile row is one coalesced load. The input's batch/row/column strides are arguments (channel stride 1), so
a channel slice of a wider tensor is read in place.

**Backward** (``pre = conv(x) + bias``, ``d_pre = dout * act'(pre)``):

1. ``_dwconv_bwd_pre_kernel`` (same tiling) recomputes ``pre`` from the nine carried taps, stores
   ``d_pre`` (x's dtype) and, if asked, ``act(pre)``, and accumulates ``d_pre * tap`` for the nine weight
   taps and ``d_pre`` for the bias in per-program fp32 partial sums (no atomics);
2. ``dx`` is the conv of ``d_pre`` with the flipped kernel: the forward kernel again, without bias or
   activation;
3. one ``sum`` over the programs' partials, in a fixed order: two backward passes are bitwise equal.
"""
import functools

import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors
from .ops_util import ONES_COLUMNS, cdiv, launchable, next_power_of_2, size_hint, with_ones_column_shape
from .reference import check_dwconv_activation
from .triton_gated_norm import _store_ones_column

_ACT_CODES = {'silu': 1, 'gelu': 2}
_NO_ACT = 0


@triton.jit
def _activation(pre, ACT: tl.constexpr):
    if ACT == 1:
        out = pre * tl.sigmoid(pre)
    elif ACT == 2:
        out = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    else:
        out = pre
    return out


@triton.jit
def _activation_grad(pre, ACT: tl.constexpr):
    if ACT == 1:
        sig = tl.sigmoid(pre)
        grad = sig * (1.0 + pre * (1.0 - sig))
    else:
        # Phi(x) + x * phi(x), with phi the standard normal density.
        grad = (0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
                + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)
    return grad


@triton.jit
def _tile_coords(H, W, C, n_cb, n_wb, n_rb, rows_per_prog, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's image, first row and row end, columns, channels, and the column masks of the 3 taps."""
    pid = tl.program_id(0)
    # Channel blocks vary fastest, then column strips, then rows: programs running together share input rows
    # (the vertical halo) in L2.
    cb = pid % n_cb
    rest = pid // n_cb
    wb = rest % n_wb
    rest = rest // n_wb
    rb = rest % n_rb
    b = rest // n_rb
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = (c < C)[None, :]
    left_ok = ((w >= 1) & (w <= W))[:, None] & c_ok
    mid_ok = (w < W)[:, None] & c_ok
    right_ok = (w + 1 < W)[:, None] & c_ok
    h0 = rb * rows_per_prog
    h_end = tl.minimum(h0 + rows_per_prog, H)
    return pid // n_cb, b, h0, h_end, w, c, left_ok, mid_ok, right_ok


@triton.jit
def _load_taps(row_base, r, H, stride_h, stride_w, offs, left_ok, mid_ok, right_ok):
    """Input row ``r`` at the tile's columns ``w-1, w, w+1`` in fp32, zero outside rows ``[0, H)`` (the
    padding, or rows past a walk's end)."""
    row_ok = (r >= 0) & (r < H)
    ptr = row_base + tl.cast(r, tl.int64) * stride_h + offs
    left = tl.load(ptr - stride_w, mask=left_ok & row_ok, other=0.0).to(tl.float32)
    mid = tl.load(ptr, mask=mid_ok & row_ok, other=0.0).to(tl.float32)
    right = tl.load(ptr + stride_w, mask=right_ok & row_ok, other=0.0).to(tl.float32)
    return left, mid, right


@triton.jit
def _load_weight_tap(Wt, c, C, k: tl.constexpr, FLIP: tl.constexpr):
    # A transposed conv is the conv with the kernel rotated by 180 degrees: tap k becomes tap 8 - k.
    idx: tl.constexpr = 8 - k if FLIP else k
    return tl.load(Wt + c * 9 + idx, mask=c < C, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _load_weight_taps(Wt, c, C, FLIP: tl.constexpr):
    """The nine taps of this program's channels, row-major (``w00`` .. ``w22``), each ``(1, BLOCK_C)``."""
    return (_load_weight_tap(Wt, c, C, 0, FLIP), _load_weight_tap(Wt, c, C, 1, FLIP),
            _load_weight_tap(Wt, c, C, 2, FLIP), _load_weight_tap(Wt, c, C, 3, FLIP),
            _load_weight_tap(Wt, c, C, 4, FLIP), _load_weight_tap(Wt, c, C, 5, FLIP),
            _load_weight_tap(Wt, c, C, 6, FLIP), _load_weight_tap(Wt, c, C, 7, FLIP),
            _load_weight_tap(Wt, c, C, 8, FLIP))


@triton.jit
def _zero_sums(BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """A walk's ten fp32 gradient sums per element (the nine taps', then the bias's), zeroed."""
    zero = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    return zero, zero, zero, zero, zero, zero, zero, zero, zero, zero


@triton.jit
def _dwconv_fwd_kernel(X, Wt, Bias, Out, H, W, C, n_cb, n_wb, n_rb, rows_per_prog,
                       stride_xb, stride_xh, stride_xw, stride_ob, stride_oh, stride_ow,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, PREFETCH: tl.constexpr,
                       STAGES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    _, b, h0, h_end, w, c, left_ok, mid_ok, right_ok = _tile_coords(
        H, W, C, n_cb, n_wb, n_rb, rows_per_prog, BLOCK_W, BLOCK_C)
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _load_weight_taps(Wt, c, C, FLIP)
    if HAS_BIAS:
        bias = tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    x_base = X + b.to(tl.int64) * stride_xb
    o_base = Out + b.to(tl.int64) * stride_ob
    x_offs = (w * stride_xw)[:, None] + c[None, :]
    o_offs = (w * stride_ow)[:, None] + c[None, :]

    # Input row r feeds output rows r+1 (kernel row 0), r (row 1) and r-1 (row 2), so two partial sums
    # roll down with the walk: `acc` for the row finished by the next input row, `nxt` for the one after.
    xl, xm, xr = _load_taps(x_base, h0 - 1, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
    acc = xl * w00 + xm * w01 + xr * w02
    xl, xm, xr = _load_taps(x_base, h0, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
    acc += xl * w10 + xm * w11 + xr * w12
    nxt = xl * w00 + xm * w01 + xr * w02
    # PREFETCH loads each row one step ahead of its use (see choose_tiles).
    last = tl.minimum(H, h_end + 1)  # the walk's last input row + 1
    if PREFETCH:
        pl, pm, pr = _load_taps(x_base, h0 + 1, last, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
    for h in tl.range(h0, h_end, num_stages=STAGES):
        if PREFETCH:
            xl, xm, xr = pl, pm, pr
            pl, pm, pr = _load_taps(x_base, h + 2, last, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
        else:
            xl, xm, xr = _load_taps(x_base, h + 1, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
        acc += xl * w20 + xm * w21 + xr * w22
        out = _activation(acc + bias, ACT)
        tl.store(o_base + tl.cast(h, tl.int64) * stride_oh + o_offs, out.to(Out.dtype.element_ty), mask=mid_ok)
        acc = nxt + xl * w10 + xm * w11 + xr * w12
        nxt = xl * w00 + xm * w01 + xr * w02


@triton.jit
def _dwconv_bwd_pre_kernel(X, Wt, Bias, DOut, DPre, Out, Part, H, W, C, n_cb, n_wb, n_rb, rows_per_prog,
                           stride_xb, stride_xh, stride_xw, stride_db, stride_dh, stride_dw,
                           ACT: tl.constexpr, NEED_OUT: tl.constexpr, PREFETCH: tl.constexpr,
                           STAGES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PAD: tl.constexpr):
    tile, b, h0, h_end, w, c, left_ok, mid_ok, right_ok = _tile_coords(
        H, W, C, n_cb, n_wb, n_rb, rows_per_prog, BLOCK_W, BLOCK_C)
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _load_weight_taps(Wt, c, C, False)
    bias = tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    x_base = X + b.to(tl.int64) * stride_xb
    x_offs = (w * stride_xw)[:, None] + c[None, :]
    d_base = DOut + b.to(tl.int64) * stride_db
    d_offs = (w * stride_dw)[:, None] + c[None, :]
    # DPre is contiguous (B, H, W, C); Out contiguous (B, H, W, C + PAD), its ones column after each pixel's
    # channels, written by the last channel block's programs.
    p_base = b.to(tl.int64) * H * W * C
    p_offs = (w * C)[:, None] + c[None, :]
    o_base = b.to(tl.int64) * H * W * (C + PAD)
    o_pixels = (w * (C + PAD))[:, None]
    last_channels = tl.program_id(0) % n_cb == n_cb - 1

    # The weight gradient pairs d_pre of an output row with all nine taps around it, so the three input
    # rows around the current output row are carried (above, here) and one new row (below) is loaded per step.
    # Products accumulate per element and are reduced over columns once, after the walk.
    al, am, ar = _load_taps(x_base, h0 - 1, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
    hl, hm, hr = _load_taps(x_base, h0, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
    g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = _zero_sums(BLOCK_W, BLOCK_C)
    # PREFETCH loads the next input row and dout row one step ahead of their use (see choose_tiles).
    # Masked-out elements get dout = 0, hence d_pre = 0, and add nothing to the sums.
    last = tl.minimum(H, h_end + 1)
    if PREFETCH:
        pl, pm, pr = _load_taps(x_base, h0 + 1, last, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
        p_dout = tl.load(d_base + tl.cast(h0, tl.int64) * stride_dh + d_offs, mask=mid_ok, other=0.0)
    for h in tl.range(h0, h_end, num_stages=STAGES):
        if PREFETCH:
            bl, bm, br = pl, pm, pr
            dout = p_dout.to(tl.float32)
            pl, pm, pr = _load_taps(x_base, h + 2, last, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
            p_dout = tl.load(d_base + tl.cast(h + 1, tl.int64) * stride_dh + d_offs,
                             mask=mid_ok & (h + 1 < h_end), other=0.0)
        else:
            bl, bm, br = _load_taps(x_base, h + 1, H, stride_xh, stride_xw, x_offs, left_ok, mid_ok, right_ok)
            dout = tl.load(d_base + tl.cast(h, tl.int64) * stride_dh + d_offs, mask=mid_ok,
                           other=0.0).to(tl.float32)
        pre = (bias + al * w00 + am * w01 + ar * w02 + hl * w10 + hm * w11 + hr * w12
               + bl * w20 + bm * w21 + br * w22)
        d_pre = dout * _activation_grad(pre, ACT)
        row = p_base + tl.cast(h, tl.int64) * W * C + p_offs
        tl.store(DPre + row, d_pre.to(DPre.dtype.element_ty), mask=mid_ok)
        if NEED_OUT:
            out_row = Out + o_base + tl.cast(h, tl.int64) * W * (C + PAD) + o_pixels
            tl.store(out_row + c[None, :], _activation(pre, ACT).to(Out.dtype.element_ty), mask=mid_ok)
            if last_channels:
                _store_ones_column(out_row + C, (w < W)[:, None], PAD)
        g00 += d_pre * al
        g01 += d_pre * am
        g02 += d_pre * ar
        g10 += d_pre * hl
        g11 += d_pre * hm
        g12 += d_pre * hr
        g20 += d_pre * bl
        g21 += d_pre * bm
        g22 += d_pre * br
        gb += d_pre
        al, am, ar = hl, hm, hr
        hl, hm, hr = bl, bm, br

    _store_param_partials(Part, tile, tl.num_programs(0) // n_cb, c, C, tl.sum(g00, axis=0), tl.sum(g01, axis=0),
                          tl.sum(g02, axis=0), tl.sum(g10, axis=0), tl.sum(g11, axis=0), tl.sum(g12, axis=0),
                          tl.sum(g20, axis=0), tl.sum(g21, axis=0), tl.sum(g22, axis=0), tl.sum(gb, axis=0))


@triton.jit
def _store_param_partials(Part, tile, tiles, c, C, s00, s01, s02, s10, s11, s12, s20, s21, s22, sb):
    """One program's sums of the nine taps' and the bias's gradients, each ``(BLOCK_C,)``, into ``Part``.

    Part is (10 * C, tiles): the weight gradient's (C, 9) layout, then the bias gradient, so one sum over tiles
    yields both as contiguous views; tiles innermost, so that the sum is an inner reduction (one launch under
    torch.compile: see "Partial sums' layout" in triton_gated_norm.py).
    """
    c_ok = c < C
    part = Part + tile
    tap = c.to(tl.int64) * 9 * tiles
    tl.store(part + tap, s00, mask=c_ok)
    tl.store(part + tap + tiles, s01, mask=c_ok)
    tl.store(part + tap + 2 * tiles, s02, mask=c_ok)
    tl.store(part + tap + 3 * tiles, s10, mask=c_ok)
    tl.store(part + tap + 4 * tiles, s11, mask=c_ok)
    tl.store(part + tap + 5 * tiles, s12, mask=c_ok)
    tl.store(part + tap + 6 * tiles, s20, mask=c_ok)
    tl.store(part + tap + 7 * tiles, s21, mask=c_ok)
    tl.store(part + tap + 8 * tiles, s22, mask=c_ok)
    tl.store(part + (9 * C + c).to(tl.int64) * tiles, sb, mask=c_ok)


def choose_tiles(x, backward=False, block_w=None, block_c=None, rows=None, num_warps=None, prefetch=None,
                 stages=None):
    """Tiling for a ``(B, H, W, C)`` map: ``(block_w, block_c, rows, num_warps, prefetch, stages)``; any of
    them can be forced.

    Tiles hold 1024 elements forward and 512 backward (the backward's pre-activation pass carries 9 input
    taps and 10 gradient sums through its walk: 158 registers at 4 elements a thread, 202 where it also writes
    the output; ptxas for sm_90, Triton 3.8), both in 4 warps. Channels first, up to 64 (one or two cache
    lines a tile row), columns fill the rest, and channels grow to 128 where the map is too narrow. ``rows``
    (walk length) is the largest of 64, 32, ..., 1 that still gives about 4 programs per SM: longer walks reread
    fewer halo rows (2 per walk), write fewer backward partial sums (one per walk) and spend less of their time
    filling and draining the pipeline.

    ``stages`` is the walk's ``tl.range(num_stages=...)``: Triton's software pipeliner copies the input rows
    (and dout rows) ``stages - 1`` steps ahead into shared memory, so more bytes are in flight per SM without
    holding them in registers. ``prefetch`` loads each row one step ahead into registers instead.

    Measured (``benchmarks/dwconv_kernels.py --sweep``, CUDA-graph replays, H200, 2026-12-02; the FFN convs of
    stages 1-3 at bs 128 and the detection one): 4 warps and 4 stages are the fastest forward at every shape
    (stage 1 FFN 0.614 -> 0.512 ms, 31 -> 38 % of copy bandwidth, against 8 warps, 1 stage and prefetch);
    backward, 4 warps, 4 stages and prefetch (1.887 -> 1.363 ms, 15 -> 21 %). More stages (6, 8) or 2 warps
    were no faster; 8 warps were slower in every setting. Walks of up to 64 rows instead of 16 (H200,
    2026-12-04, ``dwconv_kernels.py`` with each cap in one call, replayed): backward 0.449 -> 0.372 ms for the
    detection FFN conv, 1.426 -> 1.087 at stage 1's FFN conv at bs 128, 0.770 -> 0.652 at stage 2's; forward
    0.515 -> 0.474 at stage 1's; the layers' convs of stages 1 and 2 backward 0.189 -> 0.159 and 0.109 -> 0.100;
    stages 3 and 4 (14 and 7 rows) unchanged. At 64 channels of the detection map the rule keeps 16 rows: forced
    to 64 there, the walks leave too few programs (``dwconv_candidates.py``: backward 0.071 -> 0.091 ms).
    """
    # Under the interpreter, any small multiprocessor count makes the tests exercise several row blocks.
    return _tiles_for(tuple(size_hint(n) for n in x.shape), multiprocessors(x.device, interpreted=4), backward,
                      block_w, block_c, rows, num_warps, prefetch, stages)


@functools.lru_cache(maxsize=1024)  # asked four times per block per step; the answer is pure
def _tiles_for(shape, sms, backward, block_w, block_c, rows, num_warps, prefetch, stages):
    batch, height, width, channels = shape
    budget = 512 if backward else 1024
    if block_c is None:
        block_c = min(next_power_of_2(channels), 64)
        narrow = next_power_of_2(width) if block_w is None else block_w
        block_c = min(next_power_of_2(channels), max(block_c, min(128, budget // narrow)))
    if block_w is None:
        block_w = min(next_power_of_2(width), max(1, budget // block_c))
    if num_warps is None:
        num_warps = max(1, min(4, block_w * block_c // 128))
    if rows is None:
        programs = batch * cdiv(width, block_w) * cdiv(channels, block_c)
        target = 4 * sms
        rows = 64
        while rows > 1 and programs * cdiv(height, rows) < target:
            rows //= 2
    if prefetch is None:
        prefetch = backward
    if stages is None:
        stages = 4
    return block_w, block_c, rows, num_warps, prefetch, stages


def _grid(shape, block_w, block_c, rows):
    batch, height, width, channels = shape
    n_cb, n_wb, n_rb = cdiv(channels, block_c), cdiv(width, block_w), cdiv(height, rows)
    return n_cb, n_wb, n_rb, batch * n_rb * n_wb * n_cb


def _unit_channel_stride(t):
    """``t`` itself when its channels are contiguous (e.g. a channel slice of a wider map), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _taps(weight):
    """The ``(C, 1, 3, 3)`` weight as ``(C, 9)`` rows (a view when contiguous)."""
    return weight.reshape(weight.shape[0], 9).contiguous()


def _check(x, weight, bias, activation):
    check_dwconv_activation(activation)
    if x.dim() != 4:
        raise ValueError(f'x must be (B, H, W, C), got shape {tuple(x.shape)}')
    channels = x.shape[-1]
    if tuple(weight.shape) != (channels, 1, 3, 3) or tuple(bias.shape) != (channels,):
        raise ValueError(f'expected weight ({channels}, 1, 3, 3) and bias ({channels},) for {channels} channels, '
                         f'got {tuple(weight.shape)} and {tuple(bias.shape)}')


def _conv_launch(x, taps, bias, out, act, has_bias, flip, tiles):
    block_w, block_c, rows, num_warps, prefetch, stages = tiles
    batch, height, width, channels = x.shape
    n_cb, n_wb, n_rb, programs = _grid(x.shape, block_w, block_c, rows)
    launchable(_dwconv_fwd_kernel)[(programs,)](
        x, taps, bias, out, height, width, channels, n_cb, n_wb, n_rb, rows,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ACT=act, HAS_BIAS=has_bias, FLIP=flip, PREFETCH=prefetch, STAGES=stages, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=num_warps)


def dwconv_act_forward(x, weight, bias, activation, **tiling):
    """``act(dwconv3x3(x) + bias)``: one launch; contiguous ``(B, H, W, C)`` in x's dtype.

    ``tiling``: ``block_w``, ``block_c``, ``rows``, ``num_warps``, ``prefetch``, ``stages`` to force (see
    :func:`choose_tiles`).
    """
    _check(x, weight, bias, activation)
    x = _unit_channel_stride(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _conv_launch(x, _taps(weight), bias, out, _ACT_CODES[activation], True, False, choose_tiles(x, **tiling))
    return out


def dwconv_act_backward(dout, x, weight, bias, activation, need_output=False, **tiling):
    """Gradients of :func:`dwconv_act_forward`: ``(dx, dparams, output or None)``.

    Two launches and one reduction. ``need_output=True`` also returns the recomputed forward output
    ``act(dwconv3x3(x) + bias)`` with its ones column (``ops_util.with_ones_column``; a following linear layer's
    weight and bias gradients need it), written by the first launch. ``dx`` comes in x's dtype; ``dparams`` is
    the fp32 ``(10 * C,)`` weight (9 taps a channel) and bias gradients, reduced in one launch and bitwise
    reproducible.
    """
    _check(x, weight, bias, activation)
    if dout.shape != x.shape:
        raise ValueError(f'dout shape {tuple(dout.shape)} does not match x shape {tuple(x.shape)}')
    x, dout = _unit_channel_stride(x), _unit_channel_stride(dout)
    batch, height, width, channels = x.shape
    taps = _taps(weight)
    d_pre = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(with_ones_column_shape(x.shape), dtype=x.dtype, device=x.device) if need_output else None
    block_w, block_c, rows, num_warps, prefetch, stages = choose_tiles(x, backward=True, **tiling)
    n_cb, n_wb, n_rb, programs = _grid(x.shape, block_w, block_c, rows)
    part = torch.empty((10 * channels, programs // n_cb), dtype=torch.float32, device=x.device)
    if d_pre.numel():
        launchable(_dwconv_bwd_pre_kernel)[(programs,)](
            x, taps, bias, dout, d_pre, out if need_output else d_pre, part, height, width, channels,
            n_cb, n_wb, n_rb, rows, x.stride(0), x.stride(1), x.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), ACT=_ACT_CODES[activation], NEED_OUT=need_output, PREFETCH=prefetch, STAGES=stages,
            BLOCK_W=block_w, BLOCK_C=block_c, PAD=ONES_COLUMNS, num_warps=num_warps)
    dparams = part.sum(1)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel():
        # The transposed conv has the same access pattern as the forward, so it reuses the forward's tiles.
        _conv_launch(d_pre, taps, bias, dx, _NO_ACT, False, True, choose_tiles(x, **tiling))
    return dx, dparams, out


KERNEL = _dwconv_fwd_kernel  # what dispatch.kernels_interpreted inspects

"""Time other designs of the 3x3 depthwise conv + activation against the shipped row-walk kernels, in one process.

    python benchmarks/dwconv_candidates.py [--shapes det s1] [--designs walk tile inductor gather]

The shipped kernels (kernels/triton_dwconv.py) walk each program down up to 64 rows and reach about 40 % of copy
bandwidth forward and 25 % backward on an H200 (kernels/README.md), against the 70 % #15 asks. Three designs,
each checked against the fp32 reference first, then timed as CUDA-graph replays (the kernels alone), forward and
backward (pre-activation pass, partial-sum reduction, transposed conv) apart:

- ``walk``: the shipped kernels with their own tilings, then over a grid of walk lengths and tile shapes
  (``choose_tiles``' knobs, one tiling forced on both directions);
- ``tile``: no walk. A program owns a ``(BLOCK_H, BLOCK_W, BLOCK_C)`` block of outputs and loads its nine
  shifted input blocks directly (the shifts hit cache lines its neighbours and its own other taps load), so
  many small programs keep more bytes in flight than a few long walks. The backward's pre-activation pass walks
  ``steps`` blocks down so that its weight-gradient partial sums stay few;
- ``inductor``: the conv written as nine shifted slices of the zero-padded map, compiled by torch.compile
  (``dynamic=False``): what Inductor makes of it on its own, forward and backward;
- ``gather`` (forward only, for #15's inference column, where the FFN's conv is the largest pass: kernels/README.md,
  "Bytes budget of the inference forward"): the shipped walk with each input row loaded once, its two shifted
  copies made by ``tl.gather`` one column over plus a one-pixel halo load at their open end, where the shipped
  kernel loads each row three times. Not yet timed on a GPU. On the CPU (Triton 3.8, ptxas for sm_90) it compiles
  to 206 registers against the shipped forward's 128, 8 KB of shared memory against 18 KB, and its halo loads
  are 2 bytes wide.

``tile`` and ``inductor`` were both slower than the walk on an H200 (kernels/README.md, "Longer walks" and
after); they stay here to be re-measured on other cards and releases. A fourth, ``rowsum`` (the walk's backward
summing its weight-gradient products per row), was 2-8x slower at every setting and has been removed (it is in
this file at commit 7359b5c). A fifth, ``onepass`` (the pre-activation gradient and the transposed conv in one
walk, so that ``d_pre`` never goes to memory: 4 map-sized transfers instead of 6), took 1.35-1.6x the shipped
backward at every shape, its best of nine tilings each, on an H100 (thirty-third session: 0.713 against 0.451 ms at
the detection step's FFN conv), and has been removed (it is in this file at commit c70ba6b). A sixth, ``split``
(the pre-activation pass without the weight gradient, then the weight gradient in a walk of its own), was timed
on an H100 on 2026-12-06 and lost to the shipped backward (whole backward 0.508 against 0.448 ms at the detection
step's FFN conv, 1.460 against 1.298 at stage 1's; kernels/README.md); it has been removed (it is in this file at
commit 3e17f9b). On the CPU (``TRITON_INTERPRET=1``, ``--device cpu``) only the checks run, at small shapes.
"""
import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench, do_bench_cudagraph

from mmgroupmamba.kernels import depthwise_conv_act_reference
from mmgroupmamba.kernels.dwconv import split_param_grads
from mmgroupmamba.kernels.ops_util import cdiv
from mmgroupmamba.kernels.triton_dwconv import (
    _ACT_CODES,
    _NO_ACT,
    _activation,
    _activation_grad,
    _grid,
    _load_weight_taps,
    _store_param_partials,
    _tile_coords,
    choose_tiles,
    dwconv_act_backward,
    dwconv_act_forward,
)
from scan_kernels import copy_bandwidth, rel_err

SHAPES = {  # name: batch, H, W, channels, activation
    'det': (2, 200, 336, 512, 'gelu'), 's1': (128, 56, 56, 512, 'gelu'), 's2': (128, 28, 28, 1024, 'gelu'),
    's3': (128, 14, 14, 1392, 'gelu'), 'det-layer': (2, 200, 336, 64, 'silu'),
}
CPU_SHAPES = {'small': (2, 9, 13, 24, 'gelu'), 'small-silu': (1, 5, 7, 40, 'silu')}
# (rows, block_w, block_c) of the walk, forced for the forward and the backward alike.
WALK_GRID = [(16, 16, 64), (32, 16, 64), (64, 16, 64), (8, 16, 64), (16, 8, 128), (32, 8, 128), (64, 8, 128),
             (16, 32, 32), (32, 32, 32), (64, 32, 32)]
# (block_h, block_w, block_c, num_warps) of the tile forward; the backward uses the same with `steps`.
TILE_GRID = [(2, 8, 64, 4), (4, 8, 64, 4), (4, 8, 64, 8), (8, 8, 64, 8), (2, 16, 64, 4), (4, 16, 64, 8),
             (4, 4, 128, 4), (4, 8, 128, 8), (2, 8, 32, 2)]
# (rows, block_w, block_c, num_warps, stages) of the gathered-row forward: the shipped forward's tiles at stage 1 and
# the detection shape (16 x 64, 4 warps, 4 stages, 64 or 16 rows), then wider rows and other stage counts.
GATHER_GRID = [(64, 16, 64, 4, 4), (16, 16, 64, 4, 4), (64, 32, 64, 4, 4), (64, 32, 32, 4, 4), (64, 16, 64, 4, 2),
               (64, 16, 64, 4, 1), (32, 16, 64, 4, 4), (64, 64, 32, 8, 4)]
BWD_TILE_GRID = [(2, 4, 64, 4, 8), (2, 8, 64, 4, 8), (2, 8, 64, 4, 16), (1, 8, 64, 4, 16), (2, 4, 128, 4, 8),
                 (4, 4, 64, 4, 8), (2, 8, 64, 8, 8)]


@triton.jit
def _block_coords(H, W, C, n_cb, n_wb, n_hb, rows_per_prog, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The walk kernels' program order (channel blocks fastest), with the column and channel indices shaped for
    3-D blocks: this program's tile, image, first row, columns and channels."""
    tile, b, h0, _, w, c, _, _, _ = _tile_coords(H, W, C, n_cb, n_wb, n_hb, rows_per_prog, BLOCK_W, BLOCK_C)
    return tile, b, h0, w[None, :, None], c[None, None, :]


@triton.jit
def _shifted(base, h, w, c, H, W, C, stride_h, stride_w, DH: tl.constexpr, DW: tl.constexpr):
    """The input block shifted by (DH, DW), in fp32, zero outside the map."""
    hh = h + DH
    ww = w + DW
    ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & (c < C)
    return tl.load(base + hh * stride_h + ww * stride_w + c, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _tap(Wt, c, C, K: tl.constexpr, FLIP: tl.constexpr):
    idx: tl.constexpr = 8 - K if FLIP else K
    return tl.load(Wt + c * 9 + idx, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _tile_fwd_kernel(X, Wt, Bias, Out, H, W, C, n_cb, n_wb, n_hb, stride_xb, stride_xh, stride_xw,
                     stride_ob, stride_oh, stride_ow, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     FLIP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    _, b, h0, w, c = _block_coords(H, W, C, n_cb, n_wb, n_hb, BLOCK_H, BLOCK_W, BLOCK_C)
    h = (h0 + tl.arange(0, BLOCK_H))[:, None, None]
    x = X + b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, -1) * _tap(Wt, c, C, 0, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, 0) * _tap(Wt, c, C, 1, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, 1) * _tap(Wt, c, C, 2, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, -1) * _tap(Wt, c, C, 3, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, 0) * _tap(Wt, c, C, 4, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, 1) * _tap(Wt, c, C, 5, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, -1) * _tap(Wt, c, C, 6, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, 0) * _tap(Wt, c, C, 7, FLIP)
    acc += _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, 1) * _tap(Wt, c, C, 8, FLIP)
    out = _activation(acc, ACT)
    ok = (h < H) & (w < W) & (c < C)
    o = Out + b.to(tl.int64) * stride_ob + h * stride_oh + w * stride_ow + c
    tl.store(o, out.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _tile_bwd_pre_kernel(X, Wt, Bias, DOut, DPre, Part, H, W, C, n_cb, n_wb, n_hb, steps,
                         stride_xb, stride_xh, stride_xw, ACT: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    tile, b, h0, w, c = _block_coords(H, W, C, n_cb, n_wb, n_hb, steps * BLOCK_H, BLOCK_W, BLOCK_C)
    x = X + b.to(tl.int64) * stride_xb
    # DOut and DPre are contiguous (B, H, W, C).
    d_base = b.to(tl.int64) * H * W * C
    bias = tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)
    w0, w1, w2 = _tap(Wt, c, C, 0, False), _tap(Wt, c, C, 1, False), _tap(Wt, c, C, 2, False)
    w3, w4, w5 = _tap(Wt, c, C, 3, False), _tap(Wt, c, C, 4, False), _tap(Wt, c, C, 5, False)
    w6, w7, w8 = _tap(Wt, c, C, 6, False), _tap(Wt, c, C, 7, False), _tap(Wt, c, C, 8, False)
    g0 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g1 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g2 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g3 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g4 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g5 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g6 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g7 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    g8 = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    gb = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    for s in range(steps):
        h = (h0 + s * BLOCK_H + tl.arange(0, BLOCK_H))[:, None, None]
        x0 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, -1)
        x1 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, 0)
        x2 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, -1, 1)
        x3 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, -1)
        x4 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, 0)
        x5 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 0, 1)
        x6 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, -1)
        x7 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, 0)
        x8 = _shifted(x, h, w, c, H, W, C, stride_xh, stride_xw, 1, 1)
        pre = bias + x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3 + x4 * w4 + x5 * w5 + x6 * w6 + x7 * w7 + x8 * w8
        ok = (h < H) & (w < W) & (c < C)
        offs = d_base + h * W * C + w * C + c
        # Outside the map dout is 0, hence d_pre is 0 and adds nothing to the sums.
        d_pre = tl.load(DOut + offs, mask=ok, other=0.0).to(tl.float32) * _activation_grad(pre, ACT)
        tl.store(DPre + offs, d_pre.to(DPre.dtype.element_ty), mask=ok)
        g0 += d_pre * x0
        g1 += d_pre * x1
        g2 += d_pre * x2
        g3 += d_pre * x3
        g4 += d_pre * x4
        g5 += d_pre * x5
        g6 += d_pre * x6
        g7 += d_pre * x7
        g8 += d_pre * x8
        gb += d_pre
    # Summed over the block's rows and columns into the walk kernel's partial-sum layout.
    _store_param_partials(Part, tile, tl.num_programs(0) // n_cb, c.reshape(BLOCK_C), C, _block_sum(g0),
                          _block_sum(g1), _block_sum(g2), _block_sum(g3), _block_sum(g4), _block_sum(g5),
                          _block_sum(g6), _block_sum(g7), _block_sum(g8), _block_sum(gb))


@triton.jit
def _block_sum(g):
    return tl.sum(tl.sum(g, axis=0), axis=0)


def _tile_conv(x, taps, bias, out, act, has_bias, flip, block_h, block_w, block_c, num_warps):
    batch, height, width, channels = x.shape
    n_cb, n_wb, n_hb = cdiv(channels, block_c), cdiv(width, block_w), cdiv(height, block_h)
    _tile_fwd_kernel[(batch * n_hb * n_wb * n_cb,)](
        x, taps, bias, out, height, width, channels, n_cb, n_wb, n_hb, x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2), ACT=act, HAS_BIAS=has_bias, FLIP=flip, BLOCK_H=block_h,
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    return out


def tile_forward(x, weight, bias, activation, fwd_tiles):
    out = torch.empty_like(x)
    return _tile_conv(x, weight.reshape(-1, 9), bias, out, _ACT_CODES[activation], True, False, *fwd_tiles)


def tile_backward(dout, x, weight, bias, activation, fwd_tiles, bwd_tiles):
    """``(dx, dparams)`` as the walk's ``dwconv_act_backward``: pre-activation pass, one sum, transposed conv."""
    block_h, block_w, block_c, num_warps, steps = bwd_tiles
    batch, height, width, channels = x.shape
    n_cb, n_wb, n_hb = cdiv(channels, block_c), cdiv(width, block_w), cdiv(height, block_h * steps)
    taps = weight.reshape(-1, 9)
    d_pre = torch.empty_like(x)
    part = torch.empty((10 * channels, batch * n_hb * n_wb), dtype=torch.float32, device=x.device)
    _tile_bwd_pre_kernel[(batch * n_hb * n_wb * n_cb,)](
        x, taps, bias, dout, d_pre, part, height, width, channels, n_cb, n_wb, n_hb, steps, x.stride(0),
        x.stride(1), x.stride(2), ACT=_ACT_CODES[activation], BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=num_warps)
    dx = _tile_conv(d_pre, taps, bias, torch.empty_like(x), _NO_ACT, False, True, *fwd_tiles)
    return dx, part.sum(1)


@triton.jit
def _gathered_row(x_base, r, H, W, C, stride_h, stride_w, w0, c, offs, mid_ok, local, BLOCK_W: tl.constexpr):
    """Input row ``r`` at columns ``w-1, w, w+1`` in fp32 from one tile load and two one-pixel halo loads: the
    shifted tiles are the loaded one gathered one column over (``local``: each element's column in the tile), the
    halo pixel (left of the tile's first column ``w0``, right of its last) at their open end."""
    row_ok = (r >= 0) & (r < H)
    ptr = x_base + tl.cast(r, tl.int64) * stride_h
    mid = tl.load(ptr + offs, mask=mid_ok & row_ok, other=0.0).to(tl.float32)
    c_ok = (c < C) & row_ok
    halo_left = tl.load(ptr + (w0 - 1) * stride_w + c, mask=c_ok & (w0 >= 1), other=0.0).to(tl.float32)
    halo_right = tl.load(ptr + (w0 + BLOCK_W) * stride_w + c, mask=c_ok & (w0 + BLOCK_W < W),
                         other=0.0).to(tl.float32)
    left = tl.where(local == 0, halo_left[None, :], tl.gather(mid, tl.maximum(local - 1, 0), 0))
    right = tl.where(local == BLOCK_W - 1, halo_right[None, :], tl.gather(mid, tl.minimum(local + 1, BLOCK_W - 1), 0))
    return left, mid, right


@triton.jit
def _gather_fwd_kernel(X, Wt, Bias, Out, H, W, C, n_cb, n_wb, n_rb, rows_per_prog,
                       stride_xb, stride_xh, stride_xw, stride_ob, stride_oh, stride_ow,
                       ACT: tl.constexpr, STAGES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The shipped forward's walk down the rows, each input row read once (:func:`_gathered_row`) where the shipped
    kernel loads it three times, shifted (the shifts hit cached lines, but each is a load of its own, through
    shared memory where the walk is pipelined)."""
    _, b, h0, h_end, w, c, _, mid_ok, _ = _tile_coords(H, W, C, n_cb, n_wb, n_rb, rows_per_prog, BLOCK_W, BLOCK_C)
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _load_weight_taps(Wt, c, C, False)
    bias = tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    x_base = X + b.to(tl.int64) * stride_xb
    o_base = Out + b.to(tl.int64) * stride_ob
    x_offs = (w * stride_xw)[:, None] + c[None, :]
    o_offs = (w * stride_ow)[:, None] + c[None, :]
    w0 = tl.min(w, axis=0)  # the tile's first column
    local = tl.arange(0, BLOCK_W)[:, None] + tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.int32)
    xl, xm, xr = _gathered_row(x_base, h0 - 1, H, W, C, stride_xh, stride_xw, w0, c, x_offs, mid_ok, local, BLOCK_W)
    acc = xl * w00 + xm * w01 + xr * w02
    xl, xm, xr = _gathered_row(x_base, h0, H, W, C, stride_xh, stride_xw, w0, c, x_offs, mid_ok, local, BLOCK_W)
    acc += xl * w10 + xm * w11 + xr * w12
    nxt = xl * w00 + xm * w01 + xr * w02
    for h in tl.range(h0, h_end, num_stages=STAGES):
        xl, xm, xr = _gathered_row(x_base, h + 1, H, W, C, stride_xh, stride_xw, w0, c, x_offs, mid_ok, local,
                                   BLOCK_W)
        acc += xl * w20 + xm * w21 + xr * w22
        out = _activation(acc + bias, ACT)
        tl.store(o_base + tl.cast(h, tl.int64) * stride_oh + o_offs, out.to(Out.dtype.element_ty), mask=mid_ok)
        acc = nxt + xl * w10 + xm * w11 + xr * w12
        nxt = xl * w00 + xm * w01 + xr * w02


def gather_forward(x, weight, bias, activation, tiles):
    """The gathered-row forward at ``tiles`` ``(rows, block_w, block_c, num_warps, stages)``."""
    rows, block_w, block_c, num_warps, stages = tiles
    out = torch.empty_like(x)
    n_cb, n_wb, n_rb, programs = _grid(x.shape, block_w, block_c, rows)
    _gather_fwd_kernel[(programs,)](
        x, weight.reshape(-1, 9).contiguous(), bias, out, *x.shape[1:], n_cb, n_wb, n_rb, rows, x.stride(0),
        x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), ACT=_ACT_CODES[activation],
        STAGES=stages, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    return out


def shifted_sum_conv(x, weight, bias, activation):
    """The conv as nine shifted slices of the zero-padded map: plain tensor ops for Inductor to fuse."""
    height, width = x.shape[1:3]
    padded = F.pad(x.float(), (0, 0, 1, 1, 1, 1))
    taps = weight.float().reshape(-1, 9)
    pre = bias.float()
    for k in range(9):
        i, j = divmod(k, 3)
        pre = pre + padded[:, i:i + height, j:j + width, :] * taps[:, k]
    out = F.silu(pre) if activation == 'silu' else F.gelu(pre)
    return out.to(x.dtype)


def inputs(batch, height, width, channels, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, height, width, channels, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(channels, 1, 3, 3, device=device, generator=gen) * 0.3
    bias = torch.randn(channels, device=device, generator=gen) * 0.1
    return x, weight, bias, torch.randn(x.shape, device=device, dtype=dtype, generator=gen)


def expected(x, weight, bias, dout, activation):
    leaves = [t.float().detach().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv_act_reference(*leaves, activation)
    return (out, *torch.autograd.grad(out, leaves, dout.float()))


def errors(got, want):
    """Largest relative error of (out, dx, dweight, dbias)."""
    return max(rel_err(g.float(), w) for g, w in zip(got, want))


def tile_results(x, weight, bias, dout, activation, fwd_tiles, bwd_tiles):
    out = tile_forward(x, weight, bias, activation, fwd_tiles)
    dx, dparams = tile_backward(dout, x, weight, bias, activation, fwd_tiles, bwd_tiles)
    return (out, dx, *split_param_grads(dparams, weight, bias))


def candidate_settings():
    """``(label, results)`` for every tile setting: ``results(*tensors, activation)`` gives
    (out, dx, dweight, dbias)."""
    settings = []
    for fwd_tiles, bwd_tiles in zip(TILE_GRID, BWD_TILE_GRID * 2):
        settings.append((f'tile {fwd_tiles} / {bwd_tiles}', functools.partial(
            tile_results, fwd_tiles=fwd_tiles, bwd_tiles=bwd_tiles)))
    return settings


def check_candidates(shapes, device, dtype, bound):
    """Every tile setting against the fp32 reference; raises naming the first that is off."""
    for name, (batch, height, width, channels, activation) in shapes.items():
        tensors = inputs(min(batch, 2), height, width, channels, device, dtype)
        want = expected(*tensors, activation)
        for label, results in candidate_settings():
            err = errors(results(*tensors, activation), want)
            print(f'check {name} {label}: max rel err {err:.1e}', flush=True)
            if not err < bound:
                raise AssertionError(f'{name}: {label} is {err:.1e} off the reference')


def check_gather(shapes, device, dtype, bound):
    """Every gathered-row forward setting against the fp32 reference's output; raises naming the first that is
    off."""
    for name, (batch, height, width, channels, activation) in shapes.items():
        x, weight, bias, _ = inputs(min(batch, 2), height, width, channels, device, dtype)
        want = depthwise_conv_act_reference(x.float(), weight, bias, activation)
        for tiles in GATHER_GRID:
            err = rel_err(gather_forward(x, weight, bias, activation, tiles).float(), want)
            print(f'check {name} gather {tiles}: max rel err {err:.1e}', flush=True)
            if not err < bound:
                raise AssertionError(f'{name}: gather {tiles} is {err:.1e} off the reference')


def bench(fn):
    fn()
    return do_bench_cudagraph(fn, return_mode='median')


def time_walk(tensors, activation):
    x, weight, bias, dout = tensors
    # The shipped tilings first (choose_tiles' own, each direction's: the backward's tile holds half the forward's):
    # the grid below forces one tiling on both directions.
    shipped = f'fwd {choose_tiles(x)[:3]}, bwd {choose_tiles(x, backward=True)[:3]} (block_w, block_c, rows)'
    rows = [(f'walk shipped: {shipped}', bench(lambda: dwconv_act_forward(x, weight, bias, activation)),
             bench(lambda: dwconv_act_backward(dout, x, weight, bias, activation)))]
    for rows_per_prog, block_w, block_c in WALK_GRID:
        tiling = dict(rows=rows_per_prog, block_w=block_w, block_c=block_c)
        fwd = bench(lambda: dwconv_act_forward(x, weight, bias, activation, **tiling))
        bwd = bench(lambda: dwconv_act_backward(dout, x, weight, bias, activation, **tiling))
        rows.append((f'walk rows={rows_per_prog} w={block_w} c={block_c}', fwd, bwd))
    return rows


def time_tiles(tensors, activation):
    x, weight, bias, dout = tensors
    rows = []
    for fwd_tiles in TILE_GRID:
        rows.append((f'tile fwd {fwd_tiles}', bench(lambda: tile_forward(x, weight, bias, activation, fwd_tiles)),
                     None))
    best_fwd = min(rows, key=lambda r: r[1])
    fwd_tiles = TILE_GRID[rows.index(best_fwd)]
    for bwd_tiles in BWD_TILE_GRID:
        rows.append((f'tile bwd {bwd_tiles} (transposed conv {fwd_tiles})', None,
                     bench(lambda: tile_backward(dout, x, weight, bias, activation, fwd_tiles, bwd_tiles))))
    return rows


def time_inductor(tensors, activation):
    x, weight, bias, dout = tensors
    forward = torch.compile(shifted_sum_conv, dynamic=False)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def step():
        torch.autograd.grad(forward(*leaves, activation), leaves, dout)

    got = forward(*leaves, activation)
    err = errors((got, *torch.autograd.grad(got, leaves, dout)), expected(x, weight, bias, dout, activation))
    with torch.no_grad():
        fwd = bench(lambda: forward(x, weight, bias, activation))
    # Autograd's engine cannot run inside do_bench_cudagraph's capture (it works on the legacy stream), so the
    # backward is timed from back-to-back calls: at these sizes its few kernels outlast their launches.
    both = do_bench(step, return_mode='median')
    return [(f'inductor (max rel err {err:.1e}; backward from calls)', fwd, both - fwd)]


def time_gather(tensors, activation):
    x, weight, bias, _ = tensors
    return [(f'gather fwd {tiles} (rows, w, c, warps, stages)',
             bench(lambda: gather_forward(x, weight, bias, activation, tiles)), None) for tiles in GATHER_GRID]


DESIGNS = {'walk': time_walk, 'tile': time_tiles, 'inductor': time_inductor, 'gather': time_gather}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shapes', nargs='+', default=['det', 's1', 's2', 's3', 'det-layer'],
                        choices=sorted(SHAPES))
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--designs', nargs='+', default=list(DESIGNS), choices=list(DESIGNS))
    args = parser.parse_args(argv)
    if args.device == 'cpu':
        if os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('on the CPU the kernels run in Triton\'s interpreter: set TRITON_INTERPRET=1')
        check_candidates(CPU_SHAPES, 'cpu', torch.float32, 1e-5)
        check_gather(CPU_SHAPES, 'cpu', torch.float32, 1e-5)
        return
    # Launchers are called directly: without torch.library's tracing wrapper, as the ops' eager path launches.
    with set_wrap_triton_enabled(False):
        run(args)


def run(args):
    if 'tile' in args.designs:
        check_candidates({name: SHAPES[name] for name in args.shapes}, 'cuda', torch.float16, 2e-3)
    if 'gather' in args.designs:
        check_gather({name: SHAPES[name] for name in args.shapes}, 'cuda', torch.float16, 2e-3)
    bandwidth = copy_bandwidth()
    print(f'{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; fp16 maps; CUDA-graph '
          'replays, median ms (% of copy bandwidth: forward reads x and writes out, backward reads x and dout and '
          'writes dx)', flush=True)
    for name in args.shapes:
        batch, height, width, channels, activation = SHAPES[name]
        tensors = inputs(batch, height, width, channels, 'cuda', torch.float16)
        size = tensors[0].numel() * tensors[0].element_size()
        rows = [row for design in args.designs for row in DESIGNS[design](tensors, activation)]
        print(f'\n{name} {batch}x{height}x{width}x{channels} {activation}')
        print('| design | fwd ms | fwd %BW | bwd ms | bwd %BW |\n| --- | ---: | ---: | ---: | ---: |')
        for label, fwd, bwd in rows:
            cells = []
            for ms, moved in ((fwd, 2), (bwd, 3)):
                cells += ['', ''] if ms is None else [f'{ms:.3f}', f'{moved * size / (ms * 1e-3) / bandwidth:.0%}']
            print(f'| {label} | ' + ' | '.join(cells) + ' |', flush=True)
        del tensors
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()

"""Triton kernel (forward only, a candidate): the FFN's depthwise conv + GELU fused into fc2's matmul.

GroupMamba's FFN computes ``fc2(gelu(dwconv3x3(h) + conv_bias))`` on a channels-last hidden map ``h`` of
``(B, H, W, K)`` (K = 4x or 8x the stage's width). The current forward is two launches: ``dwconv_act_forward``
writes the activated hidden map, the largest tensor of the model, and cuBLAS's ``F.linear`` reads it back. Here
one kernel computes fc2's output ``(B, H, W, N)`` directly: each A tile of the matmul (pixels x hidden channels)
is computed on the fly from h's nine 3x3 taps, so the activated map never goes to memory, which saves a write and
a read of the largest map, two of the current path's three passes over it.

**Numerics** follow the current path: the conv, its bias and the exact (erf) GELU in fp32 (the same tap order
and the same ``_activation`` as ``triton_dwconv``), rounded to h's dtype as the stored activation is, then the
matmul with fc2's weight (h's dtype) in fp32 accumulation, plus fc2's bias, rounded to h's dtype.

**Tiling.** The matmul's M axis is the pixels, flattened in memory order over ``(B, H, W)``: a program owns
``BLOCK_M`` consecutive pixels (which may cross a row or an image: the masks are per pixel) and ``BLOCK_N``
output channels, and loops over the hidden channels in ``BLOCK_K`` chunks. Each chunk loads the nine shifted
``(BLOCK_M, BLOCK_K)`` tiles of h (zero outside the image), forms the activation, and multiplies it with the
``(BLOCK_K, BLOCK_N)`` tile of fc2's weight on the tensor cores. Flattened pixels rather than 2D spatial tiles:
every lane does useful work at every width (a 14x14 map in 8x8 tiles would leave 23 % of them idle, and 7, 25,
42, 84 are no multiples of 8 either); what 2D tiles would save is cache traffic, below.

**Caches.** The rows above and below a program's pixels are the centre rows of the programs ``W / BLOCK_M``
before and after it, which run at the same time (programs are launched in pixel order), so h comes from memory
about once and the nine taps from L2 or L1. With ``stages`` 2 (the default), Triton's pipeliner copies the nine
tiles into shared memory with ``cp.async.cg``, which bypasses L1: each tap is an L2 read, nine times h's bytes
(plus fc2's weight once a program). With ``stages`` 1, plain loads cached in L1 serve the taps that fall on the
program's own pixels (the left and right ones, and on maps narrower than ``BLOCK_M`` most of the rows above and
below): about three times h's bytes from L2 on wide maps, less on narrow ones, but the tiles then sit in
registers (fewer warps per multiprocessor). Which wins is for the GPU to say (``benchmarks/conv_linear.py
--sweep``).

**Work.** The conv + GELU costs tens of fp32 instructions per element of A on the CUDA cores (nine conversions
and products, the erf), more than the tensor cores spend on the matmul for N <= 448, so each element of A is
built once where the accumulator allows: one N tile covering all output channels, split only where that would
leave the GPU with too few programs (:func:`choose_tiles`).
"""
import functools

import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors
from .ops_util import cdiv, launchable, next_power_of_2, size_hint
from .triton_dwconv import _ACT_CODES, _activation, _load_taps, _load_weight_taps, _taps

_GELU = tl.constexpr(_ACT_CODES['gelu'])
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _conv_gelu_linear_kernel(Hid, Taps, ConvBias, W2, Bias2, Out, M, height, width, K, N, n_tiles,
                             stride_hb, stride_hh, stride_hw, stride_wn, stride_wk,
                             HAS_BIAS: tl.constexpr, STAGES: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    # N tiles vary fastest: the programs that rebuild the same A tiles for other output channels run together,
    # so their h reads hit L2.
    pid_n = pid % n_tiles
    pid_m = pid // n_tiles
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N

    # Each pixel's image, row and column; its taps are addressed through the strides, so the zero padding is
    # the masks: rows outside [0, height) in _load_taps, columns outside [0, width) here.
    col = m % width
    row = (m // width) % height
    image = m // (width * height)
    image_base = (Hid + image.to(tl.int64) * stride_hb)[:, None]
    row = row[:, None]
    col_offs = (col.to(tl.int64) * stride_hw)[:, None]
    left_pixel = ((col >= 1) & m_ok)[:, None]
    mid_pixel = m_ok[:, None]
    right_pixel = ((col + 1 < width) & m_ok)[:, None]
    w2_cols = W2 + (n.to(tl.int64) * stride_wn)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        offs = col_offs + k[None, :]
        left_ok = left_pixel & k_ok[None, :]
        mid_ok = mid_pixel & k_ok[None, :]
        right_ok = right_pixel & k_ok[None, :]
        w00, w01, w02, w10, w11, w12, w20, w21, w22 = _load_weight_taps(Taps, k, K, False)
        conv_bias = tl.load(ConvBias + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        # Kernel rows 0, 1, 2 read image rows row - 1, row, row + 1, summed in triton_dwconv's order (row by row,
        # then the bias), so that A's elements round as the stored activation's do. Channels past K load as zero
        # and meet zero weight rows below.
        xl, xm, xr = _load_taps(image_base, row - 1, height, stride_hh, stride_hw, offs, left_ok, mid_ok, right_ok)
        pre = xl * w00 + xm * w01 + xr * w02
        xl, xm, xr = _load_taps(image_base, row, height, stride_hh, stride_hw, offs, left_ok, mid_ok, right_ok)
        pre += xl * w10 + xm * w11 + xr * w12
        xl, xm, xr = _load_taps(image_base, row + 1, height, stride_hh, stride_hw, offs, left_ok, mid_ok, right_ok)
        pre += xl * w20 + xm * w21 + xr * w22
        hidden = _activation(pre + conv_bias, _GELU).to(Hid.dtype.element_ty)
        w2 = tl.load(w2_cols + (k.to(tl.int64) * stride_wk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # 'ieee' matters for fp32 maps only (16-bit operands always take the tensor cores): fp32 products in
        # full precision, not TF32, as F.linear's default matmul precision gives them.
        acc = tl.dot(hidden, w2, acc, input_precision='ieee')

    if HAS_BIAS:
        acc += tl.load(Bias2 + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = Out + (m.to(tl.int64) * N)[:, None] + n[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def choose_tiles(h, out_features, block_m=None, block_n=None, block_k=None, num_warps=None, stages=None):
    """Tiling for a ``(B, H, W, K)`` map into ``out_features`` channels: ``(block_m, block_n, block_k, num_warps,
    stages)``; any of them can be forced.

    ``block_n`` covers N (rounded up to a power of 2, up to 512) so that each element of A is built once: the
    conv + GELU on the CUDA cores is the expensive part, and every further N tile pays it again. The fp32
    accumulator, ``block_m x block_n``, then sets the rest. Registers below are ptxas's for sm_90 (Triton 3.8,
    fp16, the model's strides; none spill), not yet timed on a GPU:

    * N <= 64 (stage 1): 64 pixels in 4 warps, 144 registers and 42 KB of shared memory: 3 programs (12 warps)
      per multiprocessor. 128 pixels in 8 warps take 137 registers a thread, too many for two programs of 256
      threads in the 64K-register file, so they run 8 warps a multiprocessor.
    * N = 128 (stage 2): 128 pixels in 8 warps (184 registers, 8 warps a multiprocessor); 64 pixels in 4 warps
      (194 registers, two programs) run as many warps but read fc2's weight twice as often.
    * 256 < N <= 512 (stages 3 and 4: 352 and 448): 64 x 512 in 8 warps, 128 accumulator registers a thread,
      255 in all with ``block_k`` 16 (32 spills). Where that leaves fewer programs than multiprocessors (stage 4
      at bs 128: 98 programs on 132; the detection step's stage 4: 33), N is split into tiles of 256 (175
      registers with ``block_k`` 32): A is built twice, which beats idle multiprocessors. 128 < N <= 256 takes
      such 64 x 256 tiles too; N > 512 tiles of 512.

    ``block_k`` 32 elsewhere: each chunk loads nine ``block_m x block_k`` tiles of h. ``stages`` 2: Triton's
    pipeliner copies the next chunk's nine h tiles and fc2 weight tile into shared memory (cp.async) while this
    chunk computes, which also keeps them out of registers (with ``stages`` 1, 128 x 64 in 8 warps takes 248
    registers instead of 137).
    """
    # Under the interpreter, 4 multiprocessors: any small count does for the tests' tiny maps.
    return _tiles_for(tuple(size_hint(n) for n in h.shape), size_hint(out_features),
                      multiprocessors(h.device, interpreted=4), block_m, block_n, block_k, num_warps, stages)


@functools.lru_cache(maxsize=256)  # asked at every call; the answer is pure
def _tiles_for(shape, out_features, sms, block_m, block_n, block_k, num_warps, stages):
    batch, height, width, _ = shape
    if block_n is None:
        block_n = min(max(16, next_power_of_2(out_features)), 512)  # tl.dot needs 16 or more on every axis
        if block_n == 512 and cdiv(batch * height * width, block_m or 64) < sms:  # 64: a 512-column tile's
            block_n = 256
    if block_m is None:
        block_m = 128 if block_n == 128 else 64
    if block_k is None:
        block_k = 16 if block_n >= 512 else 32
    if num_warps is None:
        num_warps = 4 if block_n <= 64 else 8
    if stages is None:
        stages = 2
    return block_m, block_n, block_k, num_warps, stages


def _check(h, conv_weight, conv_bias, fc2_weight, fc2_bias):
    if h.dim() != 4:
        raise ValueError(f'h must be (B, H, W, K), got shape {tuple(h.shape)}')
    if h.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f'h must be fp16, bf16 or fp32, got {h.dtype}')
    if h.shape[-1] > 1 and h.stride(-1) != 1:
        raise ValueError(f'h must be channels-last with contiguous channels (stride 1), got strides {h.stride()}')
    hidden = h.shape[-1]
    if tuple(conv_weight.shape) != (hidden, 1, 3, 3) or tuple(conv_bias.shape) != (hidden,):
        raise ValueError(f'expected conv weight ({hidden}, 1, 3, 3) and bias ({hidden},) for {hidden} channels, '
                         f'got {tuple(conv_weight.shape)} and {tuple(conv_bias.shape)}')
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden:
        raise ValueError(f'fc2 weight must be (N, {hidden}), got {tuple(fc2_weight.shape)}')
    # The matmul runs in h's dtype, as F.linear does on the stored activation: fc2's parameters must come cast
    # (a cast here would be another launch, which is what the caller casting a block's weights at once avoids).
    if fc2_weight.dtype != h.dtype or (fc2_bias is not None and fc2_bias.dtype != h.dtype):
        raise ValueError(f"fc2's weight and bias must be in h's dtype {h.dtype}, got {fc2_weight.dtype} and "
                         f'{None if fc2_bias is None else fc2_bias.dtype}')
    if fc2_bias is not None and tuple(fc2_bias.shape) != (fc2_weight.shape[0],):
        raise ValueError(f'fc2 bias must be ({fc2_weight.shape[0]},), got {tuple(fc2_bias.shape)}')
    tensors = (h, conv_weight, conv_bias, fc2_weight) + (() if fc2_bias is None else (fc2_bias,))
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f'all tensors must be on one device, got {[str(t.device) for t in tensors]}')


def conv_gelu_linear_forward(h, conv_weight, conv_bias, fc2_weight, fc2_bias=None, **tiling):
    """``F.linear(gelu(dwconv3x3(h) + conv_bias), fc2_weight, fc2_bias)`` in one launch, forward only.

    Args:
        h (Tensor): ``(B, H, W, K)``, fp16, bf16 or fp32, channels contiguous (any batch, row and column
            strides: e.g. a channel slice of a wider map is read in place).
        conv_weight (Tensor): ``(K, 1, 3, 3)``, any float dtype (computed in fp32).
        conv_bias (Tensor): ``(K,)``, any float dtype.
        fc2_weight (Tensor): ``(N, K)`` in h's dtype.
        fc2_bias (Tensor, optional): ``(N,)`` in h's dtype.
        tiling: ``block_m``, ``block_n``, ``block_k``, ``num_warps``, ``stages`` to force (see
            :func:`choose_tiles`).

    Returns:
        Tensor: contiguous ``(B, H, W, N)`` in h's dtype. As the current path (``dwconv_act_forward`` then
        ``F.linear``) computes it, up to the matmul's summation order; fp32 inputs are multiplied in full fp32
        (no TF32), as PyTorch's default matmul precision does.
    """
    _check(h, conv_weight, conv_bias, fc2_weight, fc2_bias)
    batch, height, width, hidden = h.shape
    out_features = fc2_weight.shape[0]
    out = torch.empty((batch, height, width, out_features), dtype=h.dtype, device=h.device)
    if not out.numel():
        return out
    block_m, block_n, block_k, num_warps, stages = choose_tiles(h, out_features, **tiling)
    pixels = batch * height * width
    n_tiles = cdiv(out_features, block_n)
    has_bias = fc2_bias is not None
    launchable(_conv_gelu_linear_kernel)[(cdiv(pixels, block_m) * n_tiles,)](
        h, _taps(conv_weight), conv_bias, fc2_weight, fc2_bias if has_bias else fc2_weight, out,
        pixels, height, width, hidden, out_features, n_tiles, h.stride(0), h.stride(1), h.stride(2),
        fc2_weight.stride(0), fc2_weight.stride(1), HAS_BIAS=has_bias, STAGES=stages, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out

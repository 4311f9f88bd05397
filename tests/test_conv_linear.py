"""The FFN's depthwise conv + GELU fused into fc2 (triton_conv_linear, forward only): the Triton kernel (run by
Triton's interpreter, conftest.py) against the current two-step path, ``dwconv_act_forward`` then fc2.

The current path's matmul is cuBLAS on the GPU: products of the stored activation and fc2's weight (h's dtype)
summed in fp32, fc2's bias added in fp32, one rounding to h's dtype. PyTorch's CPU ``F.linear`` in fp16/bf16
rounds differently, so the reference here computes that linear layer in fp32 from the stored activation and
rounds once, as cuBLAS does.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

from mmgroupmamba.kernels import triton_conv_linear
from mmgroupmamba.kernels.triton_conv_linear import conv_gelu_linear_forward
from mmgroupmamba.kernels.triton_dwconv import dwconv_act_forward

# Forced tiles put several pixel blocks (crossing rows and images), hidden-channel chunks and output-channel
# tiles into tiny maps, each of them with a partial last block; 16 is tl.dot's smallest size on the GPU.
SMALL_TILES = dict(block_m=16, block_n=16, block_k=16)

# Tolerances. fp32: the kernel and the reference do the same fp32 arithmetic in another order (the conv's nine
# products, the matmul's K terms), a few units of fp32's epsilon (1.2e-7) of |out| <= ~10 here: 1e-5 leaves room.
# fp16/bf16: both round the same fp32 conv to h's dtype, where the order can move an element of A by one unit in
# the last place (ulp), and both round the fp32 result once; the outputs then differ by at most one ulp of the
# output plus such A flips weighted by fc2's weights (|w| <= 0.5): two epsilons of the dtype, relative and absolute
# (fp16: 2e-3; bf16: 1.6e-2).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2 * torch.finfo(torch.float16).eps,
             torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter (3.8) keeps bf16 tensors as their raw uint16 bits, and its ``tl.dot`` multiplies those
    bits as integers. Decode them to fp32 first (exact: bf16 is fp32's upper half), as the GPU's bf16 MMA
    multiplies the values, so that the kernel's bf16 path can be checked on the CPU. Other dtypes pass through."""
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def decode(handle):
        if handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16:
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def bf16_aware_dot(self, a, b, d, *args):
        return create_dot(self, decode(a), decode(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, 'create_dot', bf16_aware_dot)


def make_inputs(shape, out_features, dtype, seed, fc2_bias=True):
    """h in ``dtype``; the conv's parameters fp32, as under autocast; fc2's in h's dtype (cast by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    h = torch.randn(*shape, generator=gen).to(dtype)
    conv_weight = torch.randn(hidden, 1, 3, 3, generator=gen) * 0.5
    conv_bias = torch.randn(hidden, generator=gen) * 0.5
    fc2_weight = (torch.rand(out_features, hidden, generator=gen) - 0.5).to(dtype)  # |w| <= 0.5
    bias = (torch.randn(out_features, generator=gen) * 0.5).to(dtype) if fc2_bias else None
    return h, conv_weight, conv_bias, fc2_weight, bias


def current_path(h, conv_weight, conv_bias, fc2_weight, fc2_bias):
    """What the model runs today: the stored activation (``dwconv_act_forward``, h's dtype), then fc2 summed in
    fp32 and rounded once (cuBLAS's way, see the module docstring)."""
    hidden = dwconv_act_forward(h, conv_weight, conv_bias, 'gelu')
    bias = None if fc2_bias is None else fc2_bias.float()
    return F.linear(hidden.float(), fc2_weight.float(), bias).to(h.dtype)


def assert_matches_current_path(out, h, conv_weight, conv_bias, fc2_weight, fc2_bias):
    tol = TOLERANCE[h.dtype]
    expected = current_path(h, conv_weight, conv_bias, fc2_weight, fc2_bias)
    assert out.dtype == h.dtype and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # Not vacuous: the conv without its bias, or turned 180 degrees (a kernel reading its taps mirrored; on a map
    # of one pixel only the centre tap, which stays, is read), misses the same tolerance by 10 times or more.
    wrong_params = [(conv_weight, torch.zeros_like(conv_bias))]
    if h.shape[1] * h.shape[2] > 1:
        wrong_params.append((conv_weight.flip(-1, -2), conv_bias))
    for wrong_weight, wrong_bias in wrong_params:
        wrong = current_path(h, wrong_weight, wrong_bias, fc2_weight, fc2_bias).float()
        assert ((wrong - expected.float()).abs() / (tol + tol * expected.float().abs())).max() >= 10


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('shape, out_features, tiles', [
    ((2, 5, 7, 32), 16, {}),                # the launcher's own tiling: one block of all 70 pixels
    ((2, 5, 7, 40), 24, SMALL_TILES),       # 5 pixel blocks across rows and images, 3 K chunks, 2 N tiles
    ((1, 1, 9, 24), 16, SMALL_TILES),       # one row: both vertical neighbours are padding
    ((2, 6, 1, 16), 40, SMALL_TILES),       # one column: both horizontal neighbours are padding
    ((1, 1, 1, 16), 16, {}),                # one pixel: only the centre tap
    ((1, 4, 3, 48), 20, dict(block_m=32, block_n=32, block_k=32)),  # one partial block on every axis but K's 2
])
def test_matches_current_path(dtype, shape, out_features, tiles):
    args = make_inputs(shape, out_features, dtype, seed=sum(shape) + out_features)
    out = conv_gelu_linear_forward(*args, **tiles)
    assert_matches_current_path(out, *args)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_without_fc2_bias(dtype):
    args = make_inputs((2, 3, 5, 32), 16, dtype, seed=3, fc2_bias=False)
    out = conv_gelu_linear_forward(*args, **SMALL_TILES)
    assert_matches_current_path(out, *args)


def test_channel_slice_is_read_in_place():
    h, conv_weight, conv_bias, fc2_weight, fc2_bias = make_inputs((2, 4, 5, 64), 16, torch.float32, seed=5)
    fc2_weight = fc2_weight[:, :32].contiguous()
    sliced = h[..., 16:48]  # a strided (B, H, W, K) view: rows of 64 channels
    assert not sliced.is_contiguous() and sliced.stride(-1) == 1
    out = conv_gelu_linear_forward(sliced, conv_weight[:32], conv_bias[:32], fc2_weight, fc2_bias, **SMALL_TILES)
    assert torch.equal(out, conv_gelu_linear_forward(sliced.contiguous(), conv_weight[:32], conv_bias[:32],
                                                     fc2_weight, fc2_bias, **SMALL_TILES))
    assert_matches_current_path(out, sliced.contiguous(), conv_weight[:32], conv_bias[:32], fc2_weight, fc2_bias)


def test_unsupported_inputs_raise():
    h, conv_weight, conv_bias, fc2_weight, fc2_bias = make_inputs((1, 3, 3, 16), 16, torch.float16, seed=6)
    with pytest.raises(ValueError, match="h's dtype"):
        conv_gelu_linear_forward(h, conv_weight, conv_bias, fc2_weight.float(), fc2_bias)
    with pytest.raises(ValueError, match='contiguous channels'):
        conv_gelu_linear_forward(h.transpose(2, 3).contiguous().transpose(2, 3), conv_weight, conv_bias, fc2_weight,
                                 fc2_bias)
    with pytest.raises(ValueError, match='fp16, bf16 or fp32'):
        conv_gelu_linear_forward(h.double(), conv_weight, conv_bias, fc2_weight.double(), fc2_bias.double())
    with pytest.raises(ValueError, match=r'\(B, H, W, K\)'):
        conv_gelu_linear_forward(h[0], conv_weight, conv_bias, fc2_weight, fc2_bias)
    with pytest.raises(ValueError, match='conv weight'):
        conv_gelu_linear_forward(h, conv_weight[:8], conv_bias, fc2_weight, fc2_bias)
    with pytest.raises(ValueError, match='fc2 weight'):
        conv_gelu_linear_forward(h, conv_weight, conv_bias, fc2_weight[:, :8], fc2_bias)


def test_empty_map():
    h, conv_weight, conv_bias, fc2_weight, fc2_bias = make_inputs((0, 3, 3, 16), 16, torch.float32, seed=7)
    assert conv_gelu_linear_forward(h, conv_weight, conv_bias, fc2_weight, fc2_bias).shape == (0, 3, 3, 16)


@pytest.mark.parametrize('shape, out_features, block_m, block_n', [
    ((128, 56, 56, 512), 64, 64, 64),      # GroupMamba-T stage 1 at bs 128: one N tile of all 64 channels
    ((128, 28, 28, 1024), 128, 128, 128),  # stage 2
    ((128, 14, 14, 1392), 352, 64, 512),   # stage 3: one N tile of 512 columns covers the 352
    ((128, 7, 7, 1792), 448, 64, 256),     # stage 4: 98 programs of 64 pixels on 132 SMs: N split in two
    ((2, 200, 336, 512), 64, 64, 64),      # the detection step's stage 1
    ((2, 25, 42, 1792), 448, 64, 256),     # its stage 4: 33 programs, split
])
def test_tiles_by_shape(shape, out_features, block_m, block_n):
    # An H100's 132 multiprocessors; tilings as triton_conv_linear.choose_tiles explains.
    tiles = triton_conv_linear._tiles_for(shape, out_features, 132, None, None, None, None, None)
    assert tiles[:2] == (block_m, block_n)

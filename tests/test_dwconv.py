"""The fused depthwise conv + activation: Triton kernels (run by the Triton interpreter) against the reference.

conftest.py sets TRITON_INTERPRET=1 before Triton is first imported. Gradients are checked against autograd
through the float64 reference.
"""
import pytest
import torch

from mmgroupmamba.kernels import (
    depthwise_conv_act,
    depthwise_conv_act_reference,
    dwconv_act_backward,
    dwconv_act_forward,
    triton_dwconv,
)
from mmgroupmamba.kernels.ops_util import with_ones_column

# Forced tilings put several channel blocks, column strips and row walks into tiny maps.
SMALL_TILES = dict(block_w=4, block_c=8, rows=2)


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')


def force_tiles(monkeypatch, tiles, prefetch=False):
    chosen = (tiles['block_w'], tiles['block_c'], tiles['rows'], 1, prefetch, 3)
    monkeypatch.setattr(triton_dwconv, 'choose_tiles', lambda t, backward=False, **kw: chosen)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(shape, gen, dtype=torch.float32):
    channels = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype)
    weight = torch.randn(channels, 1, 3, 3, generator=gen) * 0.5
    bias = torch.randn(channels, generator=gen) * 0.5
    dout = torch.randn(*shape, generator=gen)
    return x, weight, bias, dout


def reference_value_and_grads(x, weight, bias, dout, activation):
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv_act_reference(*exact, activation)
    return (out, *torch.autograd.grad(out, exact, dout.double()))


def triton_value_and_grads(x, weight, bias, dout, activation):
    args = [t.detach().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv_act(*args, activation)
    return (out, *torch.autograd.grad(out, args, dout.to(out.dtype)))


@pytest.mark.parametrize('activation', ['silu', 'gelu'])
@pytest.mark.parametrize('shape, tiles', [
    ((2, 5, 7, 12), {}),
    ((1, 1, 9, 20), {}),            # one row: both vertical neighbours are padding
    ((2, 6, 1, 5), {}),             # one column
    ((1, 3, 4, 87), {}),            # channels not a power of two, one masked block
    ((1, 7, 9, 20), SMALL_TILES),   # 3 channel blocks, 3 column strips, 4 row walks (last one short)
    ((1, 7, 9, 20), dict(SMALL_TILES, rows=3)),  # walks of 3 rows, the last one of 1
    ((1, 70, 3, 8), dict(SMALL_TILES, rows=64)),  # the longest walks choose_tiles picks, the second one of 6 rows
])
@pytest.mark.parametrize('prefetch', [False, True])  # forced for both kernels (defaults: forward off, backward on)
def test_fp32_matches_float64_reference(activation, shape, tiles, prefetch, monkeypatch):
    gen = torch.Generator().manual_seed(sum(shape))
    x, weight, bias, dout = make_inputs(shape, gen)
    choose_tiles = triton_dwconv.choose_tiles
    if tiles:
        force_tiles(monkeypatch, tiles, prefetch)
    else:
        monkeypatch.setattr(triton_dwconv, 'choose_tiles',
                            lambda t, backward=False, **kw: choose_tiles(t, backward, prefetch=prefetch))
    fast = triton_value_and_grads(x, weight, bias, dout, activation)
    ref = reference_value_and_grads(x, weight, bias, dout, activation)
    for name, a, r in zip(['out', 'dx', 'dweight', 'dbias'], fast, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert rel_err(a, r) <= 1e-5, name
    assert fast[0].is_contiguous() and fast[1].is_contiguous()


@pytest.mark.parametrize('shape, backward, rows', [
    ((2, 200, 336, 512), False, 64),  # the detection FFN conv: long walks still leave ~10 programs per SM
    ((2, 200, 336, 512), True, 64),
    ((2, 200, 336, 64), False, 16),   # 64 channels: 64-row walks would leave ~1 program per SM
    ((128, 56, 56, 64), False, 32),  # 64 channels at bs 128: 32 rows are enough
    ((128, 14, 14, 1392), False, 64),  # the walk is longer than the map: one walk a column strip
])
def test_walks_are_as_long_as_four_programs_per_multiprocessor_allow(shape, backward, rows):
    # An H200's 132 multiprocessors (the measured choices: triton_dwconv.choose_tiles).
    assert triton_dwconv._tiles_for(shape, 132, backward, None, None, None, None, None, None)[2] == rows


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('activation', ['silu', 'gelu'])
def test_half_precision_input_with_fp32_parameters(dtype, activation):
    gen = torch.Generator().manual_seed(7)
    x, weight, bias, dout = make_inputs((2, 5, 6, 20), gen, dtype)
    dout = dout.to(dtype)
    fast = triton_value_and_grads(x, weight, bias, dout, activation)
    ref = reference_value_and_grads(x, weight, bias, dout, activation)
    assert [t.dtype for t in fast] == [dtype, dtype, torch.float32, torch.float32]
    for name, a, r in zip(['out', 'dx', 'dweight', 'dbias'], fast, ref):
        assert rel_err(a, r) <= 1e-2, name
    # The reference's own half-precision path agrees too (it computes in fp32 and casts once).
    assert rel_err(depthwise_conv_act_reference(x, weight, bias, activation), ref[0]) <= 1e-2


class _RecordingKernel:
    """Stands in for a jitted kernel: records the tensors of every launch, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append([a for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_channel_slice_is_read_in_place(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    channels = 12
    wide, weight, bias, dout = make_inputs((2, 4, 5, 2 * channels), gen)
    weight, bias, dout = weight[:channels], bias[:channels], dout[..., :channels].contiguous()
    x = wide[..., :channels]
    assert x.stride() == (4 * 5 * 24, 5 * 24, 24, 1)
    fwd = _RecordingKernel(triton_dwconv._dwconv_fwd_kernel)
    bwd = _RecordingKernel(triton_dwconv._dwconv_bwd_pre_kernel)
    # Every launch goes through ops_util.launchable (torch.library.wrap_triton where traced): record there.
    recorders = {fwd.kernel: fwd, bwd.kernel: bwd}
    monkeypatch.setattr(triton_dwconv, 'launchable', recorders.__getitem__)
    sliced = triton_value_and_grads(x, weight, bias, dout, 'gelu')
    # The forward and the pre-activation backward pass read the wide tensor's storage itself.
    assert fwd.launches[0][0].data_ptr() == wide.data_ptr() and fwd.launches[0][0].stride() == x.stride()
    assert bwd.launches[0][0].data_ptr() == wide.data_ptr() and bwd.launches[0][0].stride() == x.stride()
    assert len(fwd.launches) == 2 and len(bwd.launches) == 1  # forward; backward = pre pass + transposed conv
    copied = triton_value_and_grads(x.contiguous(), weight, bias, dout, 'gelu')
    for a, c in zip(sliced, copied):
        assert torch.equal(a, c)
    ref = reference_value_and_grads(x, weight, bias, dout, 'gelu')
    for a, r in zip(sliced, ref):
        assert rel_err(a, r) <= 1e-5
    # The incoming gradient may be strided too (read in place as well).
    wide_dout = torch.randn(2, 4, 5, 3 * channels, generator=gen)
    strided = dwconv_act_backward(wide_dout[..., channels:2 * channels], x, weight, bias, 'gelu')
    assert bwd.launches[-1][3].data_ptr() == wide_dout[..., channels:].data_ptr()
    dense = dwconv_act_backward(wide_dout[..., channels:2 * channels].contiguous(), x, weight, bias, 'gelu')
    for a, c in zip(strided[:3], dense[:3]):
        assert torch.equal(a, c)


def test_gradient_flows_back_into_the_wide_tensor():
    gen = torch.Generator().manual_seed(12)
    wide, weight, bias, _ = make_inputs((1, 3, 4, 16), gen)
    weight, bias = weight[:8], bias[:8]
    wide.requires_grad_()
    out = depthwise_conv_act(wide[..., :8], weight, bias, 'silu')
    dout = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(out, wide, dout)
    ref = reference_value_and_grads(wide[..., :8], weight, bias, dout, 'silu')
    assert rel_err(grad[..., :8], ref[1]) <= 1e-5
    assert torch.count_nonzero(grad[..., 8:]) == 0


def test_backward_is_deterministic(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    x, weight, bias, dout = make_inputs((2, 5, 6, 12), gen)
    force_tiles(monkeypatch, SMALL_TILES)
    first = dwconv_act_backward(dout, x, weight, bias, 'gelu')
    second = dwconv_act_backward(dout, x, weight, bias, 'gelu')
    assert first[3] is None
    for a, c in zip(first[:3], second[:3]):
        assert torch.equal(a, c)
    ref = reference_value_and_grads(x, weight, bias, dout, 'gelu')
    for a, r in zip(first[:3], ref[1:]):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize('activation', ['silu', 'gelu'])
def test_backward_can_return_the_forward_output(activation):
    gen = torch.Generator().manual_seed(14)
    x, weight, bias, dout = make_inputs((1, 5, 6, 12), gen, torch.bfloat16)
    dx, dweight, dbias, out = dwconv_act_backward(dout.to(torch.bfloat16), x, weight, bias, activation,
                                                  need_output=True)
    forward = dwconv_act_forward(x, weight, bias, activation)
    # The output's own channels, then its ones column (ops_util.with_ones_column) for fc2's bias gradient.
    assert out.dtype == torch.bfloat16 and torch.equal(out[..., 12:], with_ones_column(forward)[..., 12:])
    out = out[..., :12]
    # Same fp32 values summed in another order: at most one bf16 rounding step apart.
    torch.testing.assert_close(out, forward, rtol=8e-3, atol=1e-6)
    ref = reference_value_and_grads(x, weight, bias, dout.to(torch.bfloat16), activation)
    assert rel_err(out, ref[0]) <= 1e-2
    without = dwconv_act_backward(dout.to(torch.bfloat16), x, weight, bias, activation)
    for a, c in zip((dx, dweight, dbias), without[:3]):
        assert torch.equal(a, c)


def test_bad_activation_is_rejected(monkeypatch):
    x, weight, bias, dout = make_inputs((1, 2, 2, 4), torch.Generator().manual_seed(15))
    with pytest.raises(ValueError, match=r"'relu'.*'silu', 'gelu'"):
        depthwise_conv_act_reference(x, weight, bias, 'relu')
    with pytest.raises(ValueError, match=r"'GELU'.*'silu', 'gelu'"):
        dwconv_act_forward(x, weight, bias, 'GELU')
    with pytest.raises(ValueError, match=r"'tanh'"):
        dwconv_act_backward(dout, x, weight, bias, 'tanh')
    with pytest.raises(ValueError, match=r"None.*'silu', 'gelu'"):
        depthwise_conv_act(x, weight, bias, None)


def test_dispatch_follows_the_kernels_variable(monkeypatch):
    gen = torch.Generator().manual_seed(16)
    x, weight, bias, _ = make_inputs((1, 3, 5, 8), gen)
    weight.requires_grad_()
    launches = []
    launch = triton_dwconv.dwconv_act_forward
    monkeypatch.setattr(triton_dwconv, 'dwconv_act_forward', lambda *a, **k: launches.append(1) or launch(*a, **k))
    out = depthwise_conv_act(x, weight, bias, 'silu')
    assert len(launches) == 1
    monkeypatch.setenv('MMGM_KERNELS', 'reference')
    ref = depthwise_conv_act(x, weight, bias, 'silu')
    assert len(launches) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_parameter_gradients_have_the_parameters_strides():
    """DDP checks gradient strides against the parameter's: (C, 1, 3, 3) conv weights get (9, 9, 3, 1)."""
    gen = torch.Generator().manual_seed(17)
    x, weight, bias, dout = make_inputs((1, 3, 5, 8), gen)
    for impl in ('triton', 'reference'):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv('MMGM_KERNELS', impl)
            _, dweight, dbias, _ = dwconv_act_backward(dout, x, weight, bias, 'gelu')
        assert dweight.stride() == weight.stride() and dbias.stride() == bias.stride(), impl


def test_recomputed_output_has_its_ones_column_under_several_channel_blocks():
    # SMALL_TILES: 12 channels in two blocks of 8 (the last block's programs write the ones column), partial
    # 4-wide strips and 2-row walks.
    gen = torch.Generator().manual_seed(21)
    x, weight, bias, dout = make_inputs((2, 5, 7, 12), gen, torch.float32)
    _, _, out = triton_dwconv.dwconv_act_backward(dout, x, weight, bias, 'gelu', need_output=True, **SMALL_TILES)
    expected = with_ones_column(dwconv_act_forward(x, weight, bias, 'gelu'))
    assert out.shape == expected.shape and torch.equal(out[..., 12:], expected[..., 12:])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)

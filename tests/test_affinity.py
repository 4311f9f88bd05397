"""The channel-affinity op (``kernels/affinity.py``): its Triton kernels, run through the Triton interpreter
(conftest.py), against the reference, and both against the unfused PyTorch MLP the model ran before.

Its custom-op registrations are checked with the other ops' (tests/op_samples.py: torch.library.opcheck in
test_compile.py, the eager fast path in test_eager_fastpath.py).
"""
import pytest
import torch
import torch.nn.functional as F

from mmgroupmamba.kernels import channel_affinity, channel_affinity_reference
from mmgroupmamba.kernels.layout import pad_groups, unpad_groups

# (batch, channels, hidden units): GroupMamba's stages have C = 64..512 and R = C // 16; odd sizes check the
# masks of the kernels' power-of-2 tiles.
SHAPES = [(1, 12, 1), (5, 96, 6), (2, 64, 4), (3, 348, 21)]


MAP_SIZE = (3, 5)  # H, W of the maps the tests pool


def affinity_inputs(batch, channels, units, gen, x_dtype=torch.float32):
    """The layer's inputs at the scale of its initialised parameters (nn.Linear's uniform bound 1/sqrt(fan_in)),
    so that both ReLU sides and the sigmoid's slope are exercised, not saturated. The map's values have a mean
    per (image, channel) as varied as a pooled map's."""
    def uniform(*shape, fan_in):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * 2 / fan_in**0.5

    means = torch.randn(batch, 1, 1, channels, generator=gen)
    x = (means + 0.5 * torch.randn(batch, *MAP_SIZE, channels, generator=gen)).to(x_dtype)
    fc1_bias = uniform(units, fan_in=channels)
    fc1_bias[0] = 3.0  # one hidden unit alive for (almost surely) every image: gradients pass even at R = 1
    params = (uniform(units, channels, fan_in=channels), fc1_bias, uniform(channels, units, fan_in=units),
              uniform(channels, fan_in=units), torch.rand(1, generator=gen) + 0.5)
    return [t.requires_grad_() for t in (x, *params)]


def reference(x, *params):
    """The reference on the map pooled as the op pools it (in x's dtype)."""
    return channel_affinity_reference(x.mean((1, 2)), *params)


def value_and_grads(fn, inputs, gen):
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return (out, *torch.autograd.grad(out, inputs, grad))


def assert_close_fp32(got, expected, what=''):
    """Within 1e-5 of the expected values, relative to the tensor's largest: the elements are sums over up to C
    products, whose rounding depends on the order of summation and scales with the terms, not with the sum
    (which may cancel to near zero)."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=what)


def assert_matches(got, expected):
    """The scale and every gradient (:func:`value_and_grads`) as the reference's, in its dtypes and shapes."""
    assert (expected[3] != 0).any()  # the ReLU passed some gradient: the backward's whole path was checked
    for name, g, e in zip(('scale', 'x', 'fc1_weight', 'fc1_bias', 'fc2_weight', 'fc2_bias', 'skip_scale'),
                          got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        if g.dtype == torch.bfloat16:  # dx, rounded to bf16 from fp32 values within 1e-5 of each other
            torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2 * e.abs().max().item(), msg=name)
        else:
            assert_close_fp32(g, e, name)


def unfused(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """What GroupMambaLayer ran before the op (in fp32: the parameters' dtype)."""
    pooled = x.mean((1, 2))
    return skip_scale * torch.sigmoid(F.linear(F.relu(F.linear(pooled, fc1_weight, fc1_bias)), fc2_weight, fc2_bias))


@pytest.mark.parametrize('x_dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', SHAPES)
def test_triton_matches_the_reference(shape, x_dtype, monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    inputs = affinity_inputs(*shape, torch.Generator().manual_seed(0), x_dtype)
    got = value_and_grads(channel_affinity, inputs, torch.Generator().manual_seed(1))
    expected = value_and_grads(reference, inputs, torch.Generator().manual_seed(1))
    assert got[0].dtype == torch.float32 and got[0].shape == shape[:2]
    assert_matches(got, expected)


def test_triton_backward_sums_chunks_and_images_per_program(monkeypatch):
    """The backward walks the channels in chunks and sums each program's images in its row of partial sums: 200
    channels are four chunks, the last one partial, and a batch of 9 is 3 programs of 3 images under the
    interpreter (4 "multiprocessors"), so that later images add to the row the first stored."""
    from mmgroupmamba.kernels import triton_affinity

    batch, channels, units = 9, 200, 12
    assert channels > 3 * triton_affinity.CHUNK_C and channels % triton_affinity.CHUNK_C
    grids = []
    wrap = triton_affinity.launchable

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if self.kernel is triton_affinity._affinity_bwd_kernel:
                grids.append(grid)
            return wrap(self.kernel)[grid]

    monkeypatch.setattr(triton_affinity, 'launchable', Recorded)
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    inputs = affinity_inputs(batch, channels, units, torch.Generator().manual_seed(7))
    got = value_and_grads(channel_affinity, inputs, torch.Generator().manual_seed(8))
    expected = value_and_grads(reference, inputs, torch.Generator().manual_seed(8))
    assert grids == [(3,)]
    assert_matches(got, expected)


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_op_matches_the_unfused_mlp(impl, monkeypatch):
    """The op against the modules' own layers and autograd, as the model computed the scale before."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    for shape in SHAPES[:2]:
        inputs = affinity_inputs(*shape, torch.Generator().manual_seed(2))
        got = value_and_grads(channel_affinity, inputs, torch.Generator().manual_seed(3))
        expected = value_and_grads(unfused, inputs, torch.Generator().manual_seed(3))
        for g, e in zip(got, expected):
            assert_close_fp32(g, e)


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_autocast_leaves_the_op_in_fp32(impl, monkeypatch):
    """Under autocast the map comes in bf16, the fp32 parameters are used as they are and the scale and
    the parameters' gradients stay fp32: the same values as without autocast for the same input."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    inputs = affinity_inputs(2, 64, 4, torch.Generator().manual_seed(4), torch.bfloat16)
    plain = value_and_grads(channel_affinity, inputs, torch.Generator().manual_seed(5))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = value_and_grads(channel_affinity, inputs, torch.Generator().manual_seed(5))
    assert [t.dtype for t in autocast] == [torch.float32, torch.bfloat16] + [torch.float32] * 5
    for a, p in zip(autocast, plain):
        assert torch.equal(a, p)


def test_dead_hidden_units_pass_no_gradient(monkeypatch):
    """ReLU's gradient at a unit whose input is negative for every image is zero, in the kernel too."""
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    x, w1, b1, w2, b2, skip = affinity_inputs(3, 12, 2, torch.Generator().manual_seed(6))
    with torch.no_grad():
        b1[0] = -100.0
    out = channel_affinity(x, w1, b1, w2, b2, skip)
    dw1, db1, dw2 = torch.autograd.grad(out.sum(), (w1, b1, w2))
    assert (dw1[0] == 0).all() and db1[0] == 0 and (dw2[:, 0] == 0).all()
    assert dw1[1].abs().sum() > 0


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_padded_map_is_read_and_differentiated_in_its_stored_layout(impl, monkeypatch):
    """A padded stage's map (``layout.py``: 348 channels stored as 352, and 200 as 208 so that the backward's
    64-channel chunks straddle the groups' pad channels) gives the compact map's scale and parameter gradients,
    and its own gradient is the compact one laid out in the stored channels: zero in the pad channels, whatever
    the (nonzero) values sitting there."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    for batch, channels, units, stored in [(3, 348, 21, 352), (9, 200, 12, 208)]:
        inputs = affinity_inputs(batch, channels, units, torch.Generator().manual_seed(9))
        padded = torch.randn(batch, *MAP_SIZE, stored, generator=torch.Generator().manual_seed(12))
        padded.unflatten(-1, (4, stored // 4))[..., :channels // 4] = inputs[0].detach().unflatten(-1, (4, -1))
        assert torch.equal(unpad_groups(padded, channels), inputs[0])
        padded = padded.requires_grad_()
        got = value_and_grads(channel_affinity, [padded, *inputs[1:]], torch.Generator().manual_seed(10))
        expected = value_and_grads(reference, inputs, torch.Generator().manual_seed(10))
        assert got[1].shape == (batch, *MAP_SIZE, stored)
        assert torch.equal(got[1], pad_groups(unpad_groups(got[1], channels), stored))  # pad channels exactly 0
        assert_matches([got[0], unpad_groups(got[1], channels), *got[2:]], expected)


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_map_of_a_width_no_layout_stores_is_refused(impl, monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', impl)
    inputs = affinity_inputs(2, 64, 4, torch.Generator().manual_seed(11))
    with pytest.raises(ValueError, match='64 channels cannot be stored as 66'):
        channel_affinity(torch.randn(2, *MAP_SIZE, 66), *inputs[1:])


@pytest.mark.parametrize('impl', ['reference', 'triton'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_maps_gradient_is_a_broadcast_view_added_like_autograds(impl, dtype, monkeypatch):
    """The mean's backward writes no map: x's gradient from the op is the (B, S) one broadcast over H and W, and
    added to x's other gradients it gives what autograd's own mean gives, to the last place of fp32 (bf16: the
    one rounding of the division in fp32, where autograd divides the rounded bf16 gradient)."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    x, *params = affinity_inputs(2, 12, 2, torch.Generator().manual_seed(13), dtype)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(14)).to(dtype)
    dscale = torch.randn(2, 12, generator=torch.Generator().manual_seed(15))
    view, = torch.autograd.grad(channel_affinity(x, *params), x, dscale)
    assert view.stride() == (12, 0, 0, 1)
    got, = torch.autograd.grad((x * other).sum() + (channel_affinity(x, *params) * dscale).sum(), x)
    expected, = torch.autograd.grad((x * other).sum() + (reference(x, *params) * dscale).sum(), x)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    else:
        assert_close_fp32(got, expected)

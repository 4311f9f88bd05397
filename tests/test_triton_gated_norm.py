"""The norm ops' Triton kernels (``MMGM_KERNELS=triton``), run through the Triton interpreter, against the reference.

conftest.py sets TRITON_INTERPRET=1 before Triton is first imported.
"""
import pytest
import torch

from mmgroupmamba.kernels import (
    gated_group_norm,
    gated_group_norm_linear,
    gated_group_norm_reference,
    layer_norm,
    layer_norm_linear,
    modulated_layer_norm,
    modulated_layer_norm_linear,
    residual_layer_norm,
    residual_layer_norm_linear,
)
from mmgroupmamba.kernels.layout import pad_groups, unpad_groups


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def own_columns(out, ref):
    """A backward op's recomputed output without its ones column, which must be exactly ones then zeros
    (``ops_util.with_ones_column``: the following linear layer's bias gradient comes out of it)."""
    from mmgroupmamba.kernels.ops_util import with_ones_column
    width = ref.shape[-1]
    assert out.shape == with_ones_column(ref).shape
    assert torch.equal(out[..., width:], with_ones_column(out[..., :width])[..., width:])
    return out[..., :width]


def inputs(rows, channels, dtype, gen, strided_z=False):
    y = (torch.randn(rows, channels, generator=gen) * 2 + 0.5).to(dtype)
    zz = torch.randn(rows, 2 * channels, generator=gen).to(dtype)
    z = zz[:, channels:] if strided_z else zz[:, :channels].contiguous()
    w = torch.randn(channels, generator=gen)
    b = torch.randn(channels, generator=gen)
    return [t.requires_grad_() for t in (y, z, w, b)]


def value_and_grads(fn, y, z, w, b, dout):
    out = fn(y, z, w, b, 4, 1e-5)
    return (out, *torch.autograd.grad(out, (y, z, w, b), dout.to(out.dtype)))


@pytest.mark.parametrize('rows, group_dims', [(1, 4), (7, 3), (130, 16), (45, 87), (33, 112)])
@pytest.mark.parametrize('strided_z', [False, True])
def test_fp32_matches_float64_reference(rows, group_dims, strided_z):
    gen = torch.Generator().manual_seed(rows * 1000 + group_dims)
    args = inputs(rows, 4 * group_dims, torch.float32, gen, strided_z)
    dout = torch.randn(rows, 4 * group_dims, generator=gen)
    fast = value_and_grads(gated_group_norm, *args, dout)
    exact = [t.detach().double().requires_grad_() for t in args]
    ref = value_and_grads(gated_group_norm_reference, *exact, dout.double())
    for name, a, r in zip(['out', 'dy', 'dz', 'dweight', 'dbias'], fast, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert rel_err(a, r) <= 1e-5, name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    y, z, w, b = inputs(50, 4 * 24, dtype, gen)
    dout = torch.randn(50, 96, generator=gen)
    fast = value_and_grads(gated_group_norm, y, z, w, b, dout)
    exact = [t.detach().double().requires_grad_() for t in (y, z, w, b)]
    ref = value_and_grads(gated_group_norm_reference, *exact, dout.to(dtype).double())
    assert fast[0].dtype == dtype
    for name, a, r in zip(['out', 'dy', 'dz', 'dweight', 'dbias'], fast, ref):
        assert rel_err(a, r) <= 1e-2, name


def test_backward_is_deterministic_and_nd_shapes_work():
    gen = torch.Generator().manual_seed(2)
    y, z, w, b = inputs(2 * 5 * 7, 4 * 8, torch.float32, gen)
    y4 = y.detach().view(2, 5, 7, 32).requires_grad_()
    z4 = z.detach().view(2, 5, 7, 32).requires_grad_()
    dout = torch.randn(2, 5, 7, 32, generator=gen)
    first = value_and_grads(gated_group_norm, y4, z4, w, b, dout)
    second = value_and_grads(gated_group_norm, y4, z4, w, b, dout)
    assert first[0].shape == (2, 5, 7, 32)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize('tiling', [dict(groups_per_program=4), dict(groups_per_program=2, block_n=4),
                                    dict(block_n=8, num_warps=8), dict(block_n=4, tiles_per_program=5)])
@pytest.mark.parametrize('rows, group_dims, gated', [(45, 87, True), (130, 16, True), (19, 24, False)])
def test_forced_tilings_give_the_defaults_results(rows, group_dims, gated, tiling):
    """The launchers with a tiling forced (as benchmarks/norm_kernels.py sweeps them): all groups in one
    program, other row tiles, other warps, several row tiles a backward program. Only the weight and bias sums
    change order (other partial sums)."""
    from mmgroupmamba.kernels.triton_gated_norm import gated_norm_backward, gated_norm_forward
    gen = torch.Generator().manual_seed(rows + group_dims)
    y, z, w, b = (t.detach() for t in inputs(rows, 4 * group_dims, torch.float32, gen, strided_z=True))
    z = z if gated else None
    dout = torch.randn(rows, 4 * group_dims, generator=gen)
    forward_tiling = {k: v for k, v in tiling.items() if k != 'tiles_per_program'}  # the backward's alone
    default = gated_norm_forward(y, z, w, b, 4, 1e-5, torch.float32)
    forced = gated_norm_forward(y, z, w, b, 4, 1e-5, torch.float32, **forward_tiling)
    for a, c in zip(default, forced):
        assert torch.equal(a, c)
    args = (dout, y, z, w, b, *default[1:], 4, torch.float32, True)
    for name, a, c in zip(['dy', 'dz', 'dwb', 'out'], gated_norm_backward(*args), gated_norm_backward(*args, **tiling)):
        if a is None:
            assert c is None and not gated, name
        elif name == 'dwb':
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, c), name


def test_groups_per_program_must_divide_the_groups():
    from mmgroupmamba.kernels.triton_gated_norm import gated_norm_forward
    y, z, w, b = (t.detach() for t in inputs(5, 12, torch.float32, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match='groups_per_program=3 must divide groups=4'):
        gated_norm_forward(y, z, w, b, 4, 1e-5, torch.float32, groups_per_program=3)


@pytest.mark.parametrize('group_dims, groups, expected', [
    (16, 4, (4, 32)),   # stage 1: four groups a program, 32 rows of 64 channels
    (32, 4, (2, 32)),   # stage 2: two groups a program
    (87, 4, (1, 16)),   # stage 3 compact: one group of 128 padded columns
    (64, 1, (1, 32)),   # a LayerNorm over 64 channels
])
def test_default_tiles_hold_the_same_elements_however_many_groups_a_program_takes(group_dims, groups, expected):
    from mmgroupmamba.kernels.triton_gated_norm import TILE_ELEMENTS, _group_tiles, _tiles
    per_program, _ = _group_tiles(groups, group_dims, None)
    block_n, block_d, _ = _tiles(group_dims, groups_per_program=per_program)
    assert (per_program, block_n) == expected
    assert block_n * block_d * per_program == TILE_ELEMENTS


def gated_backward_matches_float64(rows, group_dims, gated, **tiling):
    """The gated norm's backward launcher (4 groups, ``tiling`` forced) against autograd through the float64
    reference: the recomputed output, dy, dz and the weight and bias gradients."""
    from mmgroupmamba.kernels.reference import group_layer_norm_reference
    from mmgroupmamba.kernels.triton_gated_norm import gated_norm_backward, gated_norm_forward
    gen = torch.Generator().manual_seed(rows * 10 + group_dims)
    y, z, w, b = (t.detach() for t in inputs(rows, 4 * group_dims, torch.float32, gen, strided_z=True))
    z = z if gated else None
    dout = torch.randn(rows, 4 * group_dims, generator=gen)
    _, mean, rstd = gated_norm_forward(y, z, w, b, 4, 1e-5, torch.float32)
    dy, dz, dwb, out = gated_norm_backward(dout, y, z, w, b, mean, rstd, 4, torch.float32, True, **tiling)
    exact = {name: t.double().requires_grad_() for name, t in zip('yzwb', (y, z, w, b)) if t is not None}
    ref = group_layer_norm_reference(exact['y'], exact.get('z'), exact['w'], exact['b'], 4, 1e-5, torch.float64)
    ref_grads = dict(zip(exact, torch.autograd.grad(ref, list(exact.values()), dout.double())))
    fast = dict(y=dy, z=dz, w=dwb[0], b=dwb[1])
    assert rel_err(own_columns(out, ref), ref) <= 1e-5
    for name, r in ref_grads.items():
        assert rel_err(fast[name], r) <= 1e-5, name


def modulated_backward_matches_float64(batch, hw, channels, **tiling):
    """The modulated norm's backward launcher (``tiling`` forced) against autograd through the float64
    reference: the recomputed output and every gradient."""
    from mmgroupmamba.kernels import modulated_layer_norm_reference
    from mmgroupmamba.kernels.triton_gated_norm import modulated_norm_backward, modulated_norm_forward
    gen = torch.Generator().manual_seed(batch * 100 + channels)
    shape = (batch, *hw, channels)
    y, x, dout = (torch.randn(shape, generator=gen) for _ in range(3))
    scale = torch.rand(batch, channels, generator=gen) + 0.5
    w, b = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    _, mean, rstd = modulated_norm_forward(y, x, scale, w, b, 1e-5)
    dy, dx, dscale, dwb, out = modulated_norm_backward(dout, y, x, scale, w, b, mean, rstd, True, **tiling)
    exact = [t.double().requires_grad_() for t in (y, x, scale, w, b)]
    ref = modulated_layer_norm_reference(*exact, 1e-5)
    ref_grads = torch.autograd.grad(ref, exact, dout.double())
    out = own_columns(out, ref)
    for name, a, r in zip(['out', 'dy', 'dx', 'dscale', 'dweight', 'dbias'], (out, dy, dx, dscale, *dwb),
                          (ref, *ref_grads)):
        assert rel_err(a, r) <= 1e-5, (name, rel_err(a, r))


# Gated: 45 rows in 12 tiles of 4 (5, 5 and 2 a program) or 6 of 8 (4 and 2); the last tile 1 or 5 rows.
# Modulated: 35 rows an image in 9 tiles of 4 (5 and 4 a program) or 5 of 8 (4 and 1); the last tile 3 rows.
@pytest.mark.parametrize('block_n, tiles_per_program', [(4, 5), (8, 4)])
@pytest.mark.parametrize('norm', ['gated', 'ungated', 'modulated'])
def test_backward_programs_walking_several_tiles_match_float64(norm, block_n, tiles_per_program):
    """Backward programs that walk several row tiles, the last program fewer, summing their partials in
    registers."""
    tiling = dict(block_n=block_n, tiles_per_program=tiles_per_program)
    if norm == 'modulated':
        modulated_backward_matches_float64(2, (5, 7), 24, **tiling)
    else:
        gated_backward_matches_float64(45, 12, norm == 'gated', **tiling)


def test_default_backward_walks_several_tiles_a_program(monkeypatch):
    """The launchers' own choice at the interpreter's 4 "multiprocessors" (16 programs wanted): several tiles a
    program, several programs, the last with fewer tiles."""
    from mmgroupmamba.kernels import triton_gated_norm
    walks = []
    choose = triton_gated_norm._backward_walk
    monkeypatch.setattr(triton_gated_norm, '_backward_walk', lambda *args: walks.append(choose(*args)) or walks[-1])
    # 130 rows in 9 tiles of 16 beside 4 group programs: 2 tiles a program, 5 programs.
    gated_backward_matches_float64(130, 87, True)
    # 63 rows an image in 16 tiles of 4, 3 images: 3 tiles a program, 6 programs an image.
    modulated_backward_matches_float64(3, (7, 9), 348)
    assert walks == [(2, 5), (3, 6)]


@pytest.mark.parametrize('variable', ['MMGM_KERNELS', 'MMGM_SCAN_IMPL'])
def test_dispatch_follows_the_kernels_variable(monkeypatch, variable):
    """Triton's statistics come out of the op; the reference path has none. The old name still works."""
    from mmgroupmamba.kernels.gated_norm import gated_group_norm_fwd
    gen = torch.Generator().manual_seed(3)
    y, z, w, b = inputs(9, 16, torch.float32, gen)
    monkeypatch.delenv('MMGM_KERNELS')
    monkeypatch.setenv(variable, 'triton')
    out, mean, _ = gated_group_norm_fwd(y, z, w, b, 4, 1e-5, torch.float32, y.shape[-1])
    assert mean.shape == (9, 4)
    monkeypatch.setenv(variable, 'reference')
    ref, mean, _ = gated_group_norm_fwd(y, z, w, b, 4, 1e-5, torch.float32, y.shape[-1])
    assert mean.numel() == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(variable, 'fast')
    with pytest.raises(ValueError, match=f'{variable}=.fast. is not one of auto, triton, reference'):
        gated_group_norm(y, z, w, b, 4, 1e-5)


@pytest.mark.parametrize('rows, channels', [(1, 8), (37, 64), (20, 348), (9, 512)])
def test_ungated_layer_norm_matches_float64(rows, channels):
    gen = torch.Generator().manual_seed(rows + channels)
    x, _, w, b = inputs(rows, channels, torch.float32, gen)
    dout = torch.randn(rows, channels, generator=gen)
    fast = value_and_grads(lambda y, z, w, b, g, e: gated_group_norm(y, None, w, b, 1, e),
                           x, x, w, b, dout)
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    out = torch.nn.functional.layer_norm(exact[0], (channels,), exact[1], exact[2], 1e-5)
    ref = (out, *torch.autograd.grad(out, exact, dout.double()))
    for name, a, r in zip(['out', 'dx', 'dweight', 'dbias'], (fast[0], fast[1], fast[3], fast[4]), ref):
        assert rel_err(a, r) <= 1e-5, name


@pytest.mark.parametrize('batch, hw, channels', [(1, (1, 1), 8), (2, (3, 5), 12), (3, (7, 9), 348), (2, (2, 3), 512)])
def test_modulated_layer_norm_matches_float64(batch, hw, channels):
    """LayerNorm(y * x * scale): tiles of one image only (several per image, partial last tiles)."""
    from mmgroupmamba.kernels import modulated_layer_norm_reference
    gen = torch.Generator().manual_seed(batch * 100 + channels)
    shape = (batch, *hw, channels)
    y, x, dout = (torch.randn(shape, generator=gen) for _ in range(3))
    scale, w, b = torch.rand(batch, channels, generator=gen) + 0.5, torch.randn(channels, generator=gen), \
        torch.randn(channels, generator=gen)
    args = [t.requires_grad_() for t in (y, x, scale, w, b)]

    def value_and_grads_of(fn, tensors):
        out = fn(*tensors, 1e-5)
        return (out, *torch.autograd.grad(out, tensors, dout.to(out.dtype)))

    fast = value_and_grads_of(modulated_layer_norm, args)
    exact = [t.detach().double().requires_grad_() for t in args]
    ref = value_and_grads_of(modulated_layer_norm_reference, exact)
    for name, a, r in zip(['out', 'dy', 'dx', 'dscale', 'dweight', 'dbias'], fast, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert rel_err(a, r) <= 1e-5, (name, rel_err(a, r))


def test_modulated_layer_norm_half_inputs():
    """fp16 maps with an fp32 scale and affine (autocast): output in fp16, gradients in each input's dtype."""
    from mmgroupmamba.kernels import modulated_layer_norm_reference
    gen = torch.Generator().manual_seed(7)
    y, x = (torch.randn(2, 4, 5, 64, generator=gen).half().requires_grad_() for _ in range(2))
    scale = torch.rand(2, 64, generator=gen) + 0.5
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    args = [y, x] + [t.requires_grad_() for t in (scale, w, b)]
    dout = torch.randn(2, 4, 5, 64, generator=gen).half()
    out = modulated_layer_norm(*args, 1e-5)
    grads = torch.autograd.grad(out, args, dout)
    exact = [t.detach().double().requires_grad_() for t in args]
    ref = modulated_layer_norm_reference(*exact, 1e-5)
    ref_grads = torch.autograd.grad(ref, exact, dout.double())
    assert out.dtype == torch.float16 and rel_err(out, ref) <= 2e-3
    for name, g, r, a in zip(['dy', 'dx', 'dscale', 'dweight', 'dbias'], grads, ref_grads, args):
        assert g.dtype == a.dtype, name
        assert rel_err(g, r) <= 5e-3, (name, rel_err(g, r))


def norm_linear_cases(gen, dtype):
    """(name, fused norm+linear, the same through the reference norm and F.linear, inputs) for each norm."""
    from mmgroupmamba.kernels import modulated_layer_norm_reference
    F = torch.nn.functional
    shape, out_channels = (2, 3, 5, 48), 20
    y, z, x = ((torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype) for _ in range(3))
    scale = torch.rand(2, 48, generator=gen) + 0.5
    w, b = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    lw, lb = torch.randn(out_channels, 48, generator=gen).to(dtype), torch.randn(out_channels, generator=gen).to(dtype)
    return [
        ('gated', lambda y, z, w, b, lw: gated_group_norm_linear(y, z, w, b, 4, 1e-5, lw),
         lambda y, z, w, b, lw: F.linear(gated_group_norm_reference(y, z, w, b, 4, 1e-5), lw), [y, z, w, b, lw]),
        ('layer norm', lambda x, w, b, lw, lb: layer_norm_linear(x, w, b, 1e-6, dtype, lw, lb),
         lambda x, w, b, lw, lb: F.linear(F.layer_norm(x, (48,), w, b, 1e-6).to(x.dtype), lw, lb), [x, w, b, lw, lb]),
        ('modulated', lambda *a: modulated_layer_norm_linear(*a[:5], 1e-5, *a[5:]),
         lambda *a: F.linear(modulated_layer_norm_reference(*a[:5], 1e-5), *a[5:]), [y, x, scale, w, b, lw, lb]),
    ]


@pytest.mark.parametrize('case', [0, 1, 2])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_norm_then_linear_matches_reference(case, dtype):
    """The pair keeps only the norm's inputs and recomputes the norm's output in its backward pass: values and
    every gradient (the linear layer's weight gradient reads the recomputed output) as the plain ops'."""
    gen = torch.Generator().manual_seed(11 + case)
    name, fused, plain, tensors = norm_linear_cases(gen, dtype)[case]
    args = [t.clone().requires_grad_() for t in tensors]
    out = fused(*args)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad(out, args, dout)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    ref = plain(*exact)
    ref_grads = torch.autograd.grad(ref, exact, dout.double())
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert out.dtype == dtype and out.shape == ref.shape and rel_err(out, ref) <= tolerance, name
    for i, (g, r, a) in enumerate(zip(grads, ref_grads, args)):
        assert g.dtype == a.dtype and g.shape == a.shape, (name, i)
        assert rel_err(g, r) <= tolerance, (name, i, rel_err(g, r))


def test_norm_then_linear_keeps_no_norm_output(monkeypatch):
    """What autograd keeps: the norm's inputs and statistics and the linear weight, no map of the output's
    size beyond those, on both paths (the reference's backward op recomputes through the reference)."""
    gen = torch.Generator().manual_seed(5)
    y, z, w, b = inputs(60, 32, torch.float32, gen)
    lw = torch.randn(16, 32, generator=gen, requires_grad=True)
    kept_maps = {}
    for impl in ('triton', 'reference'):
        monkeypatch.setenv('MMGM_KERNELS', impl)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            gated_group_norm_linear(y, z, w, b, 4, 1e-5, lw)
        kept_maps[impl] = {t.data_ptr() for t in kept if t.numel() == y.numel()}
    assert kept_maps['triton'] == kept_maps['reference'] == {y.data_ptr(), z.data_ptr()}


def padded_map(compact, stored, garbage=True):
    """``compact`` laid out padded (kernels/layout.py); the pad channels hold noise where ``garbage``: the norms
    must ignore whatever is there."""
    padded = pad_groups(compact.detach(), stored)
    if garbage:
        valid = compact.shape[-1]
        pad_mask = pad_groups(torch.ones(valid), stored) == 0
        padded = torch.where(pad_mask, torch.full_like(padded, 7.0), padded)
    return padded.requires_grad_()


def pad_channels_of(t, valid):
    """The pad channels of a padded map ``t``."""
    mask = pad_groups(torch.ones(valid), t.shape[-1]) == 0
    return t[..., mask]


@pytest.mark.parametrize('impl', ['triton', 'reference'])
@pytest.mark.parametrize('group_dims, stored_group', [(3, 4), (87, 88)])
@pytest.mark.parametrize('norm', ['gated', 'layer_norm_pad_out', 'layer_norm_compact_out', 'modulated'])
def test_padded_maps_match_the_compact_reference(monkeypatch, impl, group_dims, stored_group, norm):
    """Maps of 4 scan groups of ``group_dims`` channels stored in ``stored_group`` columns: outputs and input
    gradients of either implementation equal the fp64 reference on the compact maps, laid out padded with zeros
    in the pad channels."""
    gen = torch.Generator().manual_seed(group_dims)
    valid, stored = 4 * group_dims, 4 * stored_group
    batch, height, width = 2, 3, 5
    y, z, x = (torch.randn(batch, height, width, valid, generator=gen, dtype=torch.float64) for _ in range(3))
    w, b = torch.randn(valid, generator=gen).double(), torch.randn(valid, generator=gen).double()
    scale = torch.rand(batch, valid, generator=gen).double() + 0.5
    in_padded = norm != 'layer_norm_pad_out'
    out_padded = norm != 'layer_norm_compact_out'
    out_channels = stored if out_padded else valid
    dout = torch.randn(batch, height, width, out_channels, generator=gen).double()

    def run(y, z, x, w, b, scale, out_channels):
        if norm == 'gated':
            return gated_group_norm(y, z, w, b, 4, 1e-5, out_channels=out_channels)
        if norm == 'modulated':
            return modulated_layer_norm(y, x, scale, w, b, 1e-5)
        return layer_norm(y, w, b, 1e-5, out_channels=out_channels)

    compact = [t.clone().requires_grad_() for t in (y, z, x, w, b, scale)]
    monkeypatch.setenv('MMGM_KERNELS', 'reference')
    ref = run(*compact, valid)
    ref_grads = torch.autograd.grad(ref, compact, unpad_groups(dout, valid), allow_unused=True)
    monkeypatch.setenv('MMGM_KERNELS', impl)
    fast_inputs = [padded_map(t.float(), stored) if in_padded else t.float().requires_grad_() for t in (y, z, x)]
    fast_params = [t.float().requires_grad_() for t in (w, b, scale)]
    out = run(*fast_inputs, *fast_params, out_channels)
    assert out.shape[-1] == out_channels
    grads = torch.autograd.grad(out, fast_inputs + fast_params, dout.float(), allow_unused=True)
    assert rel_err(unpad_groups(out, valid), ref) <= 1e-5
    if out_padded:
        assert torch.equal(pad_channels_of(out, valid), torch.zeros_like(pad_channels_of(out, valid)))
    for name, g, r in zip(['dy', 'dz', 'dx', 'dweight', 'dbias', 'dscale'], grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is None:
            continue
        if g.shape[-1] == stored:
            assert torch.equal(pad_channels_of(g, valid), torch.zeros_like(pad_channels_of(g, valid))), name
            g = unpad_groups(g, valid)
        assert rel_err(g, r) <= 1e-5, name


def residual_case(gen, dtype, valid, stored, dropping):
    """x, a branch (both ``(3, 4, 5, stored)``, ``valid`` channels padded as the model stores them, zeros in the
    pad channels), the per-image keep scales (one image dropped) or None, and a LayerNorm's affine."""
    maps = [pad_groups(torch.randn(3, 4, 5, valid, generator=gen) * 2 + 0.5, stored).to(dtype) for _ in range(2)]
    keep = torch.tensor([1.25, 0.0, 1.25]) if dropping else None
    return maps, keep, torch.randn(valid, generator=gen), torch.randn(valid, generator=gen)


def plain_residual_norm(x, branch, keep, w, b, eps, out_channels):
    """The sum and its LayerNorm as plain ops on the compact channels, in x's dtype as the fused op rounds."""
    valid = w.numel()
    total = x + (branch if keep is None else branch * keep.to(branch.dtype).view(-1, 1, 1, 1))
    compact = unpad_groups(total, valid)
    out = torch.nn.functional.layer_norm(compact, (valid,), w.to(total.dtype), b.to(total.dtype), eps)
    return total, pad_groups(out, out_channels)


@pytest.mark.parametrize('impl', ['triton', 'reference'])
@pytest.mark.parametrize('valid, stored, out_channels', [(16, 16, 16), (12, 16, 16), (12, 16, 12)])
@pytest.mark.parametrize('dropping', [True, False])
@pytest.mark.parametrize('sum_read_on', [True, False])
def test_residual_layer_norm_matches_float64(monkeypatch, impl, valid, stored, out_channels, dropping, sum_read_on):
    """The residual add and the LayerNorm after it in one op: the sum and the normalised map (compact or padded,
    zeros in pad channels) and every gradient, with the sum's gradient from other readers added inside the norm's
    backward, or with the sum read by nothing else."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    gen = torch.Generator().manual_seed(valid + stored + out_channels + dropping)
    (x, branch), keep, w, b = residual_case(gen, torch.float32, valid, stored, dropping)
    tensors = [t.clone().requires_grad_() for t in (x, branch, w, b)]
    total, out = residual_layer_norm(tensors[0], tensors[1], keep, tensors[2], tensors[3], 1e-5,
                                     out_channels=out_channels)
    dtotal = pad_groups(torch.randn(3, 4, 5, valid, generator=gen), stored) if sum_read_on else None
    dout = pad_groups(torch.randn(3, 4, 5, valid, generator=gen), out_channels)
    outputs = (total, out) if sum_read_on else (out, )
    grads = torch.autograd.grad(outputs, tensors, (dtotal, dout) if sum_read_on else (dout, ))
    exact = [t.detach().double().requires_grad_() for t in (x, branch, w, b)]
    ref_total, ref_out = plain_residual_norm(*exact[:2], None if keep is None else keep.double(), *exact[2:], 1e-5,
                                             out_channels)
    ref_outputs = (ref_total, ref_out) if sum_read_on else (ref_out, )
    ref_grads = torch.autograd.grad(ref_outputs, exact, tuple(g.double() for g in
                                                              ((dtotal, dout) if sum_read_on else (dout, ))))
    assert total.shape == x.shape and out.shape[-1] == out_channels
    assert rel_err(total, ref_total) <= 1e-6 and rel_err(out, ref_out) <= 1e-5
    if out_channels != valid:
        assert torch.equal(pad_channels_of(out, valid), torch.zeros_like(pad_channels_of(out, valid)))
    for name, g, r in zip(['dx', 'dbranch', 'dweight', 'dbias'], grads, ref_grads):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert rel_err(g, r) <= 1e-5, (name, rel_err(g, r))
    if keep is not None:  # a dropped image's branch gets no gradient
        assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('dropping', [True, False])
def test_residual_norm_then_linear_matches_reference(dtype, dropping):
    """The residual add, the FFN's norm and fc1 as one pair: the sum, fc1's output and every gradient as the plain
    ops' in float64, with the sum read on (the next residual add) and the norm's output not kept."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(3 + dropping)
    (x, branch), keep, w, b = residual_case(gen, dtype, 16, 16, dropping)
    lw, lb = torch.randn(24, 16, generator=gen).to(dtype), torch.randn(24, generator=gen)
    tensors = [t.clone().requires_grad_() for t in (x, branch, w, b, lw, lb)]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        total, out = residual_layer_norm_linear(tensors[0], tensors[1], keep, tensors[2], tensors[3], 1e-6, dtype,
                                                tensors[4], tensors[5])
    assert not [t for t in kept if t.numel() == x.numel() and t.data_ptr() != total.data_ptr()]
    dtotal, dout = torch.randn(x.shape, generator=gen), torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((total, out), tensors, (dtotal.to(dtype), dout.to(dtype)))
    exact = [t.detach().double().requires_grad_() for t in (x, branch, w, b, lw, lb)]
    ref_total, normed = plain_residual_norm(*exact[:2], None if keep is None else keep.double(), *exact[2:4], 1e-6, 16)
    ref_out = F.linear(normed, *exact[4:])
    ref_grads = torch.autograd.grad((ref_total, ref_out), exact, (dtotal.double(), dout.double()))
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert total.dtype == out.dtype == dtype
    assert rel_err(total, ref_total) <= tolerance and rel_err(out, ref_out) <= tolerance
    for name, g, r, a in zip(['dx', 'dbranch', 'dweight', 'dbias', 'dlinear_weight', 'dlinear_bias'], grads,
                             ref_grads, tensors):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert rel_err(g, r) <= tolerance, (name, rel_err(g, r))

"""The Triton selective scan, run on the CPU through the Triton interpreter, against the float64 oracle.

conftest.py sets TRITON_INTERPRET=1 before Triton is first imported.
"""
import pytest
import torch

from mmgroupmamba.kernels import scan as scan_module
from mmgroupmamba.kernels import triton_scan
from mmgroupmamba.kernels.dispatch import kernels_interpreted
from mmgroupmamba.kernels.scan import selective_scan
from scan_oracle import random_scan_inputs, scan_loop_float64


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')


def selective_scan_triton(u, delta, A_logs, B, C, D, delta_bias, hw, **tiling):
    """The scan op (Triton under the fixture's MMGM_KERNELS=triton) with forced tilings."""
    return selective_scan(u, delta, A_logs, B, C, D, delta_bias, hw, tiling=tiling)


NAMES = ['u', 'delta', 'A_logs', 'B', 'C', 'D', 'delta_bias']


def rel_err(a, b):
    # Absolute where the exact value is 0 (dA at L=1: there is no earlier state to decay).
    ref_norm = b.double().norm()
    return ((a.double() - b.double()).norm() / (ref_norm if ref_norm > 0 else 1.0)).item()


def scan_and_grads(fn, inputs, grad_out):
    y = fn(**inputs)
    grads = torch.autograd.grad(y, [inputs[n] for n in NAMES], grad_out.to(y.dtype))
    return y, grads


def compare_with_oracle(hw, channels, dtype=torch.float32, batch=2, seed=0, **tiling):
    gen = torch.Generator().manual_seed(seed)
    inputs = random_scan_inputs(batch, hw, channels, generator=gen, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, hw[0] * hw[1], channels, generator=gen, dtype=torch.float64)
    y, grads = scan_and_grads(lambda **kw: selective_scan_triton(**kw, **tiling), inputs, grad_out)
    # The oracle sees exactly the (possibly rounded) low-precision inputs, upcast to float64.
    exact = {k: (v.detach().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    y_ref, grads_ref = scan_and_grads(scan_loop_float64, exact, grad_out)
    assert y.dtype == dtype and y.shape == inputs['u'].shape
    errors = {'y': rel_err(y, y_ref)}
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        errors[name] = rel_err(g, g_ref)
    return errors


# (hw, channels, tiling): odd maps, L=1, one-row/one-column maps, 3/5/9 channels a group (not powers of
# two), several channel blocks a group, tiles longer than the sequence, and the sequence split with
# different tiles and chunks in the forward and backward passes; the tile loops software-pipelined.
CASES = [
    ((1, 1), 8, {}),
    ((1, 6), 4, {}),
    ((7, 1), 4, dict(block_t=4)),
    ((3, 5), 12, dict(block_t=4)),
    ((3, 5), 12, dict(block_t=(8, 4), chunk_len=(8, 4))),
    ((5, 3), 20, dict(block_t=(4, 8), block_c=4, chunk_len=(4, 8))),
    ((4, 6), 36, dict(block_c=(16, 4), chunk_len=(32, 8))),
    ((5, 7), 8, dict(block_t=8, chunk_len=16)),
    ((5, 7), 8, dict(block_t=4, chunk_len=(8, 16), stages=(3, 2))),  # pipelined tile loops (a GPU setting)
    # more chunks than a tile has rows: each program composes the summaries before its chunk over several
    # tiles, the last one partly masked
    ((5, 7), 8, dict(block_t=(2, 4), chunk_len=(2, 4))),
]


@pytest.mark.parametrize('hw,channels,tiling', CASES,
                         ids=[f'{c[0][0]}x{c[0][1]}-c{c[1]}-{i}' for i, c in enumerate(CASES)])
def test_fp32_matches_float64_oracle(hw, channels, tiling):
    errors = compare_with_oracle(hw, channels, **tiling)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize('channels', [64, 96])
def test_detection_defaults_match_float64_oracle(channels):
    """The tilings picked for a GPU at a detection batch, run in the interpreter: with an H100's 132
    multiprocessors, batch 2 gives too few programs, so the sequence is split and the short tiles of that regime
    are used (at 96 channels, 24 a group, not a multiple of 16 as stage 3's 88 is not: tiles 32 channels wide and
    16 steps long, so the forward saves a state every 16 steps)."""
    hw = (9, 17)
    length = hw[0] * hw[1]
    cfg = triton_scan._config_for(2, length, channels, 132, ((None, None),) * 5)
    assert cfg.fwd.n_chunks(length) > 1 and cfg.bwd.n_chunks(length) > 1, cfg
    tiling = {name: (getattr(cfg.fwd, name), getattr(cfg.bwd, name))
              for name in ('block_t', 'block_c', 'num_warps', 'chunk_len')}
    errors = compare_with_oracle(hw, channels, **tiling)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('split', [False, True])
def test_low_precision_inputs(dtype, split):
    tiling = dict(block_t=4, chunk_len=4) if split else dict(block_t=8)
    errors = compare_with_oracle((3, 5), 12, dtype=dtype, seed=1, **tiling)
    assert max(errors.values()) <= 1e-2, errors


def test_kernels_are_the_ones_that_ran(monkeypatch):
    """Through the public op with MMGM_KERNELS=triton, the Triton launchers run and the reference doesn't."""
    assert kernels_interpreted(triton_scan)
    calls = []
    for name in ('scan_forward', 'scan_backward'):
        original = getattr(triton_scan, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(triton_scan, name, counted)

    def no_reference(*args, **kwargs):
        raise AssertionError('the reference ran')
    monkeypatch.setattr(scan_module, 'selective_scan_reference', no_reference)
    gen = torch.Generator().manual_seed(3)
    inputs = random_scan_inputs(1, (3, 3), 8, generator=gen, requires_grad=True)
    y = selective_scan(**inputs)
    y.sum().backward()
    assert calls == ['scan_forward', 'scan_backward']
    assert rel_err(y, scan_loop_float64(**inputs)) < 1e-5


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(4)
    inputs = random_scan_inputs(2, (5, 3), 20, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 15, 20, generator=gen)
    tiling = dict(block_t=4, block_c=4, chunk_len=8)
    runs = [scan_and_grads(lambda **kw: selective_scan_triton(**kw, **tiling), inputs, grad_out) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name, a, b in zip(NAMES, runs[0][1], runs[1][1]):
        assert torch.equal(a, b), name


def test_impl_variable(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    inputs = random_scan_inputs(1, (2, 3), 8, generator=gen)
    expected = scan_loop_float64(**inputs)
    monkeypatch.delenv('MMGM_KERNELS')  # the variable's old name, still honoured
    for impl in ('auto', 'reference', 'triton', 'TRITON'):
        monkeypatch.setenv('MMGM_SCAN_IMPL', impl)
        assert rel_err(selective_scan(**inputs), expected) < 1e-5, impl
    monkeypatch.setenv('MMGM_SCAN_IMPL', 'cuda')
    with pytest.raises(ValueError, match='MMGM_SCAN_IMPL.*auto, triton, reference'):
        selective_scan(**inputs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    inputs = random_scan_inputs(1, (2, 3), 8, generator=gen)
    monkeypatch.delenv('TRITON_INTERPRET')
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        selective_scan(**inputs)


def test_autocast_keeps_dtypes():
    # Under autocast the scan still reads each tensor in its own dtype and returns u's dtype.
    gen = torch.Generator().manual_seed(7)
    inputs = random_scan_inputs(1, (3, 3), 8, generator=gen, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = selective_scan_triton(**inputs, block_t=4)
    assert y.dtype == torch.float32
    assert rel_err(y, scan_loop_float64(**inputs)) < 1e-5


@pytest.mark.parametrize('tiling', [{}, dict(block_t=4, block_c=4, chunk_len=8)])
def test_delta_b_and_c_read_in_place_as_slices_of_one_projection(tiling):
    """The layer passes delta, B and C as column slices of one (batch, L, channels + 8) tensor (one matmul):
    the same results and gradients as contiguous copies, bit for bit, and no copy is made."""
    gen = torch.Generator().manual_seed(3)
    inputs = random_scan_inputs(2, (3, 5), 12, generator=gen, dtype=torch.float32, requires_grad=True)
    joined = torch.cat([inputs['delta'], inputs['B'], inputs['C']], -1).detach().requires_grad_()
    grad_out = torch.randn(2, 15, 12, generator=gen)
    sliced = dict(inputs, delta=joined[..., :12], B=joined[..., 12:16], C=joined[..., 16:])
    read = scan_module._triton_inputs(*(sliced[n] for n in NAMES))
    assert read[1] is sliced['delta'] and read[3] is sliced['B'] and read[4] is sliced['C']  # no copies
    y_sliced = selective_scan_triton(**sliced, **tiling)
    g_joined, = torch.autograd.grad(y_sliced, [joined], grad_out)
    y, grads = scan_and_grads(lambda **kw: selective_scan_triton(**kw, **tiling), inputs, grad_out)
    torch.testing.assert_close(y_sliced, y, rtol=0, atol=0)
    torch.testing.assert_close(g_joined, torch.cat([grads[1], grads[3], grads[4]], -1), rtol=0, atol=0)

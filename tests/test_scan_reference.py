import pytest
import torch

from mmgroupmamba.kernels import linear_recurrence, scan_order_index, selective_scan
from scan_oracle import random_scan_inputs, scan_loop_float64


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('hw', [(1, 1), (1, 7), (5, 1), (3, 5), (6, 4), (13, 11)])
@pytest.mark.parametrize('channels', [4, 12])
def test_reference_matches_float64_loop(hw, channels):
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1] + channels)
    inputs = random_scan_inputs(2, hw, channels, generator=gen)
    out = selective_scan(**inputs)
    assert out.dtype == torch.float32 and out.shape == inputs['u'].shape
    assert rel_err(out, scan_loop_float64(**inputs)) < 1e-5


def test_reference_gradients_match_float64_loop():
    gen = torch.Generator().manual_seed(0)
    inputs = random_scan_inputs(2, (5, 7), 8, generator=gen, dtype=torch.float64, requires_grad=True)
    names = ['u', 'delta', 'A_logs', 'B', 'C', 'D', 'delta_bias']
    grad_out = torch.randn(2, 35, 8, generator=gen, dtype=torch.float64)
    fast = torch.autograd.grad((selective_scan(**inputs) * grad_out).sum(), [inputs[n] for n in names])
    slow = torch.autograd.grad((scan_loop_float64(**inputs) * grad_out).sum(), [inputs[n] for n in names])
    for name, a, b in zip(names, fast, slow):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize('length', [1, 2, 15, 16, 17, 255, 256, 300, 4099])
def test_linear_recurrence_any_length(length):
    gen = torch.Generator().manual_seed(length)
    log_a = -torch.rand(3, length, generator=gen, dtype=torch.float64) * 3
    x = torch.randn(3, length, generator=gen, dtype=torch.float64)
    expected = torch.zeros_like(x)
    h = torch.zeros(3, dtype=torch.float64)
    for t in range(length):
        h = log_a[:, t].exp() * h + x[:, t]
        expected[:, t] = h
    assert rel_err(linear_recurrence(log_a, x), expected) < 1e-12


def test_strong_decay_stays_finite():
    # Large steps make exp(cumsum) underflow; the chunked form must still give exact, finite values.
    log_a = torch.full((1, 500), -80.0)
    x = torch.ones(1, 500)
    h = linear_recurrence(log_a, x)
    assert torch.isfinite(h).all() and torch.allclose(h, torch.ones_like(h))


def test_scan_order_index_directions():
    order = scan_order_index((2, 3), 4)
    assert order.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    with pytest.raises(ValueError, match='groups=3'):
        scan_order_index((2, 3), 3)

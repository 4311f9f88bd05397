"""The whole backbone through the Triton kernels (run by the Triton interpreter on the CPU).

With TRITON_INTERPRET=1 and MMGM_SCAN_IMPL=triton every scan and norm of the model runs the real Triton
kernels; the model must still reproduce the golden official outputs and the reference path's gradients.
conftest.py sets TRITON_INTERPRET=1 before Triton is first imported.
"""
from pathlib import Path

import pytest
import torch

from mmgroupmamba import GroupMamba

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden' / 'golden_mini_seed0.pt'


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN, weights_only=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_golden_through_triton_kernels(golden, monkeypatch):
    monkeypatch.setenv('MMGM_SCAN_IMPL', 'triton')
    model = GroupMamba(arch=golden['arch_cfg']).eval()
    model.load_state_dict(golden['state_dict'], strict=False)
    with torch.no_grad():
        outs = model(golden['input'])
    for out, expected in zip(outs, golden['stage_outputs']):
        assert rel_err(out, expected) <= 1e-4


def test_gradients_match_reference_path(golden, monkeypatch):
    model = GroupMamba(arch=golden['arch_cfg']).train()
    model.load_state_dict(golden['state_dict'], strict=False)
    x = golden['input'][:1, :, :40, :56]
    grads = {}
    for impl in ('triton', 'reference'):
        monkeypatch.setenv('MMGM_SCAN_IMPL', impl)
        model.zero_grad(set_to_none=True)
        sum((o * o).mean() for o in model(x)).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Per tensor loosely (a scalar like skip_scale sums many cancelling terms), all together tightly.
    for name, ref in grads['reference'].items():
        if ref.norm() > 0:
            assert rel_err(grads['triton'][name], ref) <= 1e-3, name
    flat = [torch.cat([g.flatten() for g in grads[impl].values()]) for impl in ('triton', 'reference')]
    assert rel_err(*flat) <= 1e-5


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_model_cast_to_bf16_trains_without_autocast(impl, monkeypatch):
    """``model.to(torch.bfloat16)``: every op keeps the maps in bf16 (the scan and norm parameters are packed
    in fp32, which must not promote the maps), and every gradient comes back in its parameter's dtype."""
    monkeypatch.setenv('MMGM_SCAN_IMPL', impl)
    torch.manual_seed(0)
    arch = dict(stem_hidden_dim=8, embed_dims=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1])
    model = GroupMamba(arch=arch).to(torch.bfloat16)
    outs = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert {o.dtype for o in outs} == {torch.bfloat16}
    sum(o.float().square().mean() for o in outs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad).all(), name

"""``benchmarks/dwconv_candidates.py``: the candidate design with kernels of its own (tiles without a walk) and the
shifted-slice formulation Inductor compiles give the reference's conv and gradients (Triton interpreter)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import dwconv_candidates  # noqa: E402


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')


def test_tile_kernels_match_the_reference(capsys):
    # Two images, 9 rows, 13 columns, 24 channels: every setting leaves partial blocks on each axis.
    dwconv_candidates.check_candidates({'small': (2, 9, 13, 24, 'gelu')}, 'cpu', torch.float32, 1e-5)
    out = capsys.readouterr().out
    assert out.count('check small tile') == len(dwconv_candidates.TILE_GRID)


@pytest.mark.parametrize('activation', ['silu', 'gelu'])
def test_shifted_slices_match_the_reference(activation):
    x, weight, bias, dout = dwconv_candidates.inputs(2, 5, 7, 12, 'cpu', torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    out = dwconv_candidates.shifted_sum_conv(*leaves, activation)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    assert dwconv_candidates.errors(got, dwconv_candidates.expected(x, weight, bias, dout, activation)) < 1e-5


def test_gathered_row_forward_matches_the_reference(capsys):
    # 37 columns: two whole 16-column tiles and a partial one, so that every tile's halo columns are read from
    # its neighbours; 40 channels leave a partial 32-channel block.
    dwconv_candidates.check_gather({'wide': (2, 6, 37, 40, 'gelu')}, 'cpu', torch.float32, 1e-5)
    assert capsys.readouterr().out.count('check wide gather') == len(dwconv_candidates.GATHER_GRID)

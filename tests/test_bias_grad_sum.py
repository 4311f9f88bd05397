"""``benchmarks/bias_grad_sum.py``: its Triton column sum (Triton interpreter) and the detection step's shapes."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import bias_grad_sum  # noqa: E402


@pytest.mark.parametrize('rows, columns', [(1000, 64), (37, 200), (4096, 24), (1, 8)])
def test_triton_column_sum_matches_fp64(rows, columns):
    # Partial row and column blocks, more rows than one program's run, and fewer rows than one block.
    g = torch.randn(rows, columns, generator=torch.Generator().manual_seed(rows))
    got = bias_grad_sum.triton_colsum(g, programs=6)
    assert got.dtype == torch.float32 and got.shape == (columns,)
    torch.testing.assert_close(got.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)


def test_detection_step_shapes_are_the_57_bias_sums():
    shapes = bias_grad_sum.det_shapes('tiny')
    assert sum(count for *_, count in shapes) == 19 * 3
    read = sum(rows * columns * 2 * count for rows, columns, _, count in shapes)
    assert 1.1e9 < read < 1.3e9  # the forty-second session's estimate from the profile
    fc1_stage1 = shapes[1]
    assert fc1_stage1 == (2 * 200 * 336, 512, 64, 3)

"""``benchmarks/gemm_alignment.py`` lists each block's matmuls per stage with the shapes the model runs (the timing
itself runs on a GPU only)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from gemm_alignment import block_matmuls, padded, products, row_padded_products  # noqa: E402


def test_tiny_stage_3_is_the_unaligned_one():
    rows = block_matmuls('tiny', 128, (224, 224))
    assert len(rows) == 4 * 6
    unaligned = {stage for stage, _, _, k, n in rows if (padded(k), padded(n)) != (k, n)}
    assert unaligned == {3}
    fc1 = {stage: (m, k, n) for stage, name, m, k, n in rows if name == 'fc1'}
    assert fc1 == {1: (128 * 56 * 56, 64, 512), 2: (128 * 28 * 28, 128, 1024), 3: (128 * 14 * 14, 348, 1392),
                   4: (128 * 7 * 7, 448, 1792)}
    assert padded(348) == 352


def test_the_three_products_have_the_linear_layers_shapes():
    out = {name: fn().shape for name, fn in products(5, 3, 4, torch.float32, 'cpu').items()}
    assert out == {'fwd': (5, 4), 'dgrad': (5, 3), 'wgrad': (4, 3)}


def test_row_padded_products_write_into_views_with_rows_padded_to_8():
    """The 'rows padded' variant keeps K and N but hands cuBLAS operands and results whose row stride is a
    multiple of 8: the results must land in those views (``out=``), not in new contiguous tensors."""
    fns = row_padded_products(5, 3, 4, torch.float32, 'cpu')
    out = {name: fn() for name, fn in fns.items()}
    assert {name: t.shape for name, t in out.items()} == {'fwd': (5, 4), 'dgrad': (5, 3), 'wgrad': (4, 3)}
    assert {name: t.stride() for name, t in out.items()} == {'fwd': (8, 1), 'dgrad': (8, 1), 'wgrad': (8, 1)}

"""``benchmarks/launch_overhead.py``'s pieces that need no GPU."""
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from launch_overhead import bound_values, grid_3d  # noqa: E402


@triton.jit
def _kernel(X, Y, n, scale=2.0, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False):
    pass


def test_bound_values_are_the_parameters_in_signature_order():
    """What ``JITFunction.run`` hands the compiled kernel: every parameter in order, keywords placed, defaults
    filled in, the launch options (not parameters) left out."""
    x, y = object(), object()
    assert bound_values(_kernel, (x, y, 7), dict(FLAG=True, num_warps=4, num_stages=2)) == (x, y, 7, 2.0, 16, True)
    assert bound_values(_kernel, (x, ), dict(n=3, Y=y, BLOCK=64)) == (x, y, 3, 2.0, 64, False)


def test_grids_are_padded_to_three_dimensions():
    assert grid_3d((5, )) == (5, 1, 1)
    assert grid_3d((5, 2)) == (5, 2, 1)
    assert grid_3d((5, 2, 3)) == (5, 2, 3)

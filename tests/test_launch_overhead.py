"""``benchmarks/launch_overhead.py``'s pieces that need no GPU."""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from launch_overhead import bound_values, cases, grid_3d, specialization_key  # noqa: E402


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


def test_specialization_keys_follow_what_triton_specialises_on():
    """Constexprs by value; tensors by dtype and 16-byte alignment; integers by being 1, a multiple of 16 and
    within 32 bits: two launches differing only elsewhere get the same key."""
    base = torch.zeros(64, dtype=torch.float16)
    constexprs = frozenset({3})
    key = specialization_key((base, 32, 1.5, 64), constexprs)
    assert specialization_key((torch.zeros(64, dtype=torch.float16), 48, 2.5, 64), constexprs) == key
    assert specialization_key((base[1:], 32, 1.5, 64), constexprs) != key  # 2 bytes in: not 16-byte aligned
    assert specialization_key((base.float(), 32, 1.5, 64), constexprs) != key
    assert specialization_key((base, 33, 1.5, 64), constexprs) != key
    assert specialization_key((base, 1, 1.5, 64), constexprs) != specialization_key((base, 17, 1.5, 64), constexprs)
    assert specialization_key((base, 2**32, 1.5, 64), constexprs) != key
    assert specialization_key((base, 32, 1.5, 128), constexprs) != key  # a constexpr by its value


def test_each_case_launcher_gives_the_op_output(monkeypatch):
    """The launcher row times what the op runs: called as in ``cases``, each launcher returns the op's output
    (through Triton's interpreter on the CPU)."""
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    with torch.no_grad():
        for name, ours, launcher, _ in cases(torch.device('cpu')):
            torch.testing.assert_close(launcher(), ours(), rtol=0, atol=0, msg=name)

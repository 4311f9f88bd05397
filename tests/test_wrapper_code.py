"""``benchmarks/wrapper_code.py``: the launches of Inductor's wrapper modules by kind, from a wrapper's source
(``compiled_kernels.py``) and from the wrappers a real compile loaded (``profile_step.py --compile``)."""
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from wrapper_code import (  # noqa: E402
    launch_table,
    launches,
    loaded_wrapper_modules,
    static_launch_table,
    widest_elements,
)

WRAPPER = '''
class Runner:
    def call(self, args):
        primals_1, = args
        # Topologically Sorted Source Nodes: [], Original ATen: [aten.mul, aten.sum]
        triton_red_fused_mul_sum_0.run(primals_1, buf0, 64, stream=raw_stream0)
        _scan_fwd_kernel_3.run(buf0, buf1, 64, stream=raw_stream0)
        extern_kernels.mm(buf1, primals_1, out=buf2)
        triton_poi_fused_add_1.run(buf2, 64, stream=raw_stream0)
        return (buf2, )
'''


def test_launches_are_named_by_kind_and_fused_ops():
    by_kind, by_origin = launches(WRAPPER)
    assert by_kind == {'inductor red': 1, 'ours _scan_fwd_kernel': 1, 'extern_kernels.mm': 1, 'inductor poi': 1}
    assert by_origin == {'red: aten.mul, aten.sum': 1, 'poi: ': 1}
    table = launch_table([WRAPPER, WRAPPER.replace('extern_kernels.mm(buf1, primals_1, out=buf2)\n', '')])
    assert '| extern_kernels.mm | 1 | 0 | 1 |' in table
    assert table.splitlines()[-1] == '| **total** | **4** | **3** | **7** |'


def test_no_wrapper_is_an_error_not_an_empty_table():
    """With Inductor's C++ wrapper no Python wrapper is loaded; the listing must say so, not print zero launches."""
    with pytest.raises(ValueError, match='cpp_wrapper'):
        launch_table([])


def test_the_wrappers_of_a_real_compile_are_found():
    """A function compiled by Inductor (here for the CPU) leaves its wrapper among the loaded ones, with a call()
    that launches its kernel."""
    torch._dynamo.reset()
    before = len(loaded_wrapper_modules())
    compiled = torch.compile(lambda x: torch.sin(x) * 3 + 1, backend='inductor')
    compiled(torch.randn(16))
    sources = [source for _, source in loaded_wrapper_modules()[before:]]
    assert len(sources) == 1 and 'def call(' in sources[0]
    assert 'sin' in sources[0]


class StaticTritonCompileResult:  # the class names Inductor's compile results go by
    pass


class TritonCompileResult:
    pass


class Autotuner:
    def __init__(self, *results):
        self.compile_results, self.launchers = list(results), []


def test_kernels_are_counted_by_launcher():
    """Each autotuner of a wrapper module once: static where every compile result is Inductor's static one,
    Triton's launcher where any is not, unknown where it holds none; other globals are not kernels."""
    module = types.SimpleNamespace(
        triton_poi_fused_add_0=Autotuner(StaticTritonCompileResult()),
        triton_red_fused_sum_1=Autotuner(StaticTritonCompileResult(), TritonCompileResult()),
        _scan_fwd_kernel_3=Autotuner(TritonCompileResult()),
        _dwconv_fwd_kernel_0=Autotuner(),
        async_compile=object(), empty_strided_cuda=len)
    backward = types.SimpleNamespace(_scan_bwd_kernel_1=Autotuner(StaticTritonCompileResult()))
    table = static_launch_table([module, backward])
    assert table.splitlines()[2:] == ['| inductor | 1 | 1 | 0 |', '| ours | 1 | 1 | 1 |']


KERNELS = """
triton_poi_fused_cat_0 = async_compile.triton('triton_poi_fused_cat_0', '''
@triton.jit
def triton_poi_fused_cat_0(in_ptr0, in_ptr1, in_ptr2, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 1000
    tmp0 = tl.load(in_ptr0 + x0, tmp1 & xmask, other=0.0)
    tmp2 = tl.load(in_ptr1 + x0, tmp3 & xmask, other=0.0)
    tmp4 = tl.load(in_ptr2 + x0, tmp5 & xmask, other=0.0)
''', device_str='cuda')

triton_poi_fused_1 = async_compile.triton('triton_poi_fused_1', '''
@triton.jit
def triton_poi_fused_1(in_ptr0, in_ptr1, out_ptr0, out_ptr1, XBLOCK : tl.constexpr):
    pid = tl.program_id(0)
    if pid % 2 == 0:
        xnumel = 5000
        tmp0 = tl.load(in_ptr0 + x0, xmask)
    elif pid % 2 == 1:
        xnumel = 10
        tmp1 = tl.load(in_ptr1 + x0, xmask)
        tmp2 = tl.load(in_ptr1 + x1, xmask)
''', device_str='cuda')

triton_red_fused_sum_2 = async_compile.triton('triton_red_fused_sum_2', '''
def triton_red_fused_sum_2(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    xnumel = 100000
    tmp0 = tl.load(in_ptr0 + x0, xmask)
''', device_str='cuda')
"""


def test_widest_elements_reads_each_combo_sub_kernel_and_skips_reductions():
    """A concatenation of three pieces loads three times an element; a combo kernel's sub-kernels are counted
    apart (one load over 5000 elements, two over 10), and reductions are left out."""
    assert widest_elements(KERNELS, 5) == [(1, 5000, 'triton_poi_fused_1'), (3, 1000, 'triton_poi_fused_cat_0'),
                                           (2, 10, 'triton_poi_fused_1')]
    assert widest_elements(KERNELS, 1) == [(1, 5000, 'triton_poi_fused_1')]

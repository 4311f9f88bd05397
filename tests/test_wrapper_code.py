"""``benchmarks/wrapper_code.py``: the launches of Inductor's wrapper modules by kind, from a wrapper's source
(``compiled_kernels.py``) and from the wrappers a real compile loaded (``profile_step.py --compile``)."""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from wrapper_code import launch_table, launches, loaded_wrapper_modules, static_launch_table  # noqa: E402

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

"""Whether one compile with symbolic sizes (GroupMamba's default ``compile=True``) serves new input sizes on the
path a GPU runs, checked on a machine without a GPU.

    python benchmarks/dynamic_sizes_trace.py [--arch mini] [--sizes 2x128x192 2x160x128 2x96x224]

On CUDA the fused ops are traced into the compiled graph: their Triton launches, and the Python that picks their
tilings and grids from the sizes. On the CPU they stay opaque (reference path, interpreter), so the CPU tests of
``compile=True`` cannot see a guard that this Python would add on a size, and a guard that new sizes fail means a
compile per detection batch size (minutes each). This script traces the Triton path as ``compiled_kernels.py``
does (device queries answered as an H200's, fake tensors on the CPU), through ``GroupMamba(compile=...)`` with
``dynamic=True``, Dynamo and AOTAutograd (Inductor's decompositions), and stops before Inductor: the compiled
forward it hands back raises instead of running kernels. Each size is then fed in turn, as an AMP fp16 training
step's forward; a size that fails the guards of the compiles so far is traced again, and counted. Printed: the
forward graphs traced after each size. The kernels are never compiled or run.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop('TRITON_INTERPRET', None)  # the traced launches need the kernels' TTIR, which interpreted ones lack
os.environ['MMGM_KERNELS'] = 'triton'
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from compiled_kernels import pretend_h200  # noqa: E402


class _Traced(Exception):
    """Raised by the compiled forward in place of running it."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='mini')
    parser.add_argument('--sizes', nargs='+', default=['2x128x192', '2x160x128', '2x96x224'],
                        help='input sizes BxHxW, fed in this order')
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split('x')) for size in args.sizes]
    pretend_h200()  # before mmgroupmamba's import, as in compiled_kernels.py
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from mmgroupmamba import GroupMamba

    forward_graphs = []

    def stop(gm, example_inputs):
        def run(*_):
            raise _Traced()
        run._boxed_call = True
        return run

    def forward_compiler(gm, example_inputs):
        forward_graphs.append(gm)
        return stop(gm, example_inputs)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=stop,
                           decompositions=select_decomp_table())
    model = GroupMamba(arch=args.arch, drop_path_rate=0.2, out_indices=(0, 1, 2, 3),
                       compile=dict(backend=backend, dynamic=True)).train()
    for batch, height, width in sizes:
        start = time.perf_counter()
        try:
            with torch.autocast('cpu', dtype=torch.float16):
                model(torch.randn(batch, 3, height, width))
        except _Traced:
            pass
        print(f'{batch}x{height}x{width}: forward graphs traced so far {len(forward_graphs)} '
              f'({time.perf_counter() - start:.0f} s)', flush=True)
    print(f'{args.arch}: {len(forward_graphs)} forward graph(s) for {len(sizes)} input sizes')


if __name__ == '__main__':
    main()

"""Where a GroupMamba training step spends its time: wall time against GPU kernel time, and the top CUDA ops.

    python benchmarks/profile_step.py [--arch tiny] [--batch 128] [--size 224 224] [--rows 30]
                                      [--compile [MODE]] [--dynamic]

``--compile`` runs the backbone through its ``compile`` option (default mode, or ``reduce-overhead`` ...;
static sizes unless ``--dynamic``) and adds the host side: the top CPU ops of the profiled step.

A step whose wall time is well above its summed kernel time is bound by the host (Python, dispatch and
launches), not by the GPU. The kernels are also summed by family (hand-written Triton, Inductor's, GEMMs,
cuDNN, PyTorch's own elementwise, reduction and copy kernels, fills): launches and GPU time of each.
"""
import argparse
import collections
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from backbone_speed import backbone_step
from mmgroupmamba import GroupMamba

# Kernel families, first match wins: where a step's launches come from (eager and compiled steps differ).
FAMILIES = (
    ('ours (Triton, hand-written)', r'^_\w+_kernel'),
    ('Inductor (generated Triton)', r'^triton_(poi|red|per|for|tem)_'),
    ('cuDNN (convolutions, norms)', r'cudnn|conv|implicit_gemm|batchnorm|bn_'),
    ('GEMM (cuBLAS, CUTLASS)', r'gemm|nvjet|cutlass|cublas|splitKreduce'),
    ('PyTorch elementwise', r'elementwise_kernel'),
    ('PyTorch reductions', r'reduce_kernel'),
    ('PyTorch copies, concatenations', r'CatArray|copy|Memcpy'),
    ('fills', r'Memset|fill'),
)


def kernel_family(name):
    return next((family for family, pattern in FAMILIES if re.search(pattern, name)), 'other')


def family_table(kernels):
    """Launches and GPU ms per kernel family, largest first."""
    launches, ms = collections.Counter(), collections.Counter()
    for e in kernels:
        family = kernel_family(e.key)
        launches[family] += e.count
        ms[family] += e.self_device_time_total / 1000
    lines = ['| kernel family | launches | GPU ms |', '| --- | ---: | ---: |']
    lines += [f'| {family} | {launches[family]} | {ms[family]:.2f} |' for family, _ in launches.most_common()]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224))
    parser.add_argument('--rows', type=int, default=30)
    parser.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE')
    parser.add_argument('--dynamic', action='store_true')
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    compile_options = False
    if args.compile:
        compile_options = dict(mode=args.compile, dynamic=args.dynamic)
    model = GroupMamba(arch=args.arch, out_indices=(3,), compile=compile_options).cuda().train()
    step = backbone_step(model, torch.randn(args.batch, 3, *args.size, device='cuda'))

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f'first step (compiles with --compile) {time.perf_counter() - start:.1f} s', flush=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 10
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1000
    # Host time alone: the same step with the GPU already idle is timed up to its last launch.
    start = time.perf_counter()
    step()
    host_ms = (time.perf_counter() - start) * 1000
    torch.cuda.synchronize()

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.compile else [])
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels only: with CPU activity on (--compile), an op's row also carries the device time of the
    # kernels it launched, and Inductor's launch of a user-defined Triton kernel is such a row, named like
    # the kernel; summing every row would count those kernels twice.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1000
    launches = sum(e.count for e in kernels)
    print(events.table(sort_by='self_device_time_total', row_limit=args.rows, max_name_column_width=60))
    print(family_table(kernels))
    if args.compile:
        print(events.table(sort_by='self_cpu_time_total', row_limit=args.rows, max_name_column_width=60))
        print('dynamo counters:', {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v})
    print(f'{args.arch} batch {args.batch} {tuple(args.size)}: wall {wall_ms:.1f} ms/step, host (launch) '
          f'{host_ms:.1f} ms, GPU kernels {kernel_ms:.1f} ms in {launches} launches')


if __name__ == '__main__':
    main()

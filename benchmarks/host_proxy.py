"""The host work of an eager training step, measured on the CPU: a stand-in for the GPU's host-bound eager rows.

    python benchmarks/host_proxy.py [--models GroupMamba-T Swin-T] [--steps 20] [--size 32 32] [--fp32]

On the H200 the eager det step is bound by its host: GroupMamba-T spent about 76 us of host time per launch
against Swin-T's 37 (twenty-fourth session, README), in its Python autograd nodes, the fused ops' launchers and
PyTorch's dispatch. That work does not need a GPU. This script runs each model's eager training step (bs 2,
forward + backward, bf16 autocast standing in for CUDA fp16, drop path 0.2) on the CPU, with two changes:

* the widths are a quarter of the model's (GroupMamba-T's 64/128/348/448 channels become 16/32/92/112, stage 3
  still stored padded; Swin-T's 96 becomes 32, with 1/2/4/8 heads), on a 32x32 image, so that the CPU's compute
  is small. Depths, MLP ratios, windows and every op of the step are the model's, and so is the host work;
* our Triton kernels (through Triton's interpreter, ``MMGM_KERNELS=triton``: the GPU path's launchers, tiling
  choices and glue) are not run: each launch returns at once and is counted.

It prints the best and the median step time of each model (one process each, in turn), GroupMamba's ratio
to Swin, and the ATen operators each step calls from Python or from autograd's engine (``torch.profiler``, one
step after the timed ones; the operators those call inside ATen are not counted). That count is the eager
step's host work in a number that does not vary with the machine: on GPU hosts each such call costs microseconds
of dispatch whether or not it launches a kernel (views, reshapes, casts that change nothing, allocations), and
the eager det step's ratio to Swin-T has followed it (twenty-seventh session: 175.4 against 67.8 ms, 2.59x, for
about 1640 launches each; this script counts 7323 operators against 2566 at 9030dff, 2.85x). But those
operators take about Swin-T's time on the CPU (thirtieth session): the step's excess is the Python around them,
so the script also counts the calls one step makes from Python (functions and built-ins, as cProfile counts
them, in one more step), the other machine-independent measure of that work.

What it leaves out: the CUDA launch itself and the caching allocator (about 5-10 us a launch on the GPU host),
and Triton's own launcher for our kernels; what it adds: the CPU's compute, which at these sizes is mostly the
matmuls' fixed cost (tens of us each, for GroupMamba and Swin alike). So read the times as an A/B of host work
between two versions of the code or two models on one machine, not as a GPU prediction.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

SWIN_HEADS = (1, 2, 4, 8)


def narrow_groupmamba(drop_path_rate):
    from mmgroupmamba import GroupMamba
    from mmgroupmamba.models.groupmamba import ARCH_SETTINGS
    arch = dict(ARCH_SETTINGS['tiny'], stem_hidden_dim=8, embed_dims=[16, 32, 92, 112])
    return GroupMamba(arch=arch, drop_path_rate=drop_path_rate)


def narrow_swin(drop_path_rate):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    from backbone_speed import swin_config
    cfg, _ = swin_config('T', drop_path_rate)
    cfg.update(embed_dims=32, num_heads=list(SWIN_HEADS))
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


BUILDERS = {'GroupMamba-T': narrow_groupmamba, 'Swin-T': narrow_swin}


def measure(name, steps, size, fp32):
    """``(best s, median s, our launches per step, ATen operators per step, Python calls per step)`` of
    ``name``'s eager training step, in this process."""
    import torch
    import triton.runtime.interpreter as interpreter

    torch.set_num_threads(1)
    launches = [0]

    def skipped_launch(self, *args, **kwargs):
        launches[0] += 1

    interpreter.InterpretedFunction.run = skipped_launch
    model = BUILDERS[name](0.2)
    model.train()
    images = torch.randn(2, 3, *size)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=not fp32):
            loss = sum(o.float().mean() for o in model(images))
        loss.backward()

    for _ in range(3):
        step()
    launches[0] = 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), launches[0] / steps, operators_called(step), python_calls(step)


def python_calls(step):
    """The function calls, Python functions and built-ins alike, that one call of ``step`` makes (cProfile's
    count)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(step)
    return pstats.Stats(profiler).total_calls


def operators_called(step):
    """The ATen operators one call of ``step`` calls from outside ATen: from Python (the models' code, ours,
    PyTorch's modules) or from autograd's engine (the backward of PyTorch's own operators)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events()
               if e.name.startswith('aten::') and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--size', type=int, nargs=2, default=(32, 32))
    parser.add_argument('--fp32', action='store_true', help='no autocast')
    parser.add_argument('--one', help=argparse.SUPPRESS)  # the child process measuring one model
    args = parser.parse_args()
    if args.one:
        print('RESULT', *measure(args.one, args.steps, args.size, args.fp32))
        return
    # One process per model: Triton's interpreter must be chosen before Triton is imported, and neither model's
    # warm state (allocator, caches) should reach the other's.
    env = dict(os.environ, TRITON_INTERPRET='1', MMGM_KERNELS='triton')
    rows = {}
    for name in args.models:
        command = [sys.executable, __file__, '--one', name, '--steps', str(args.steps), '--size', *map(str, args.size)]
        result = subprocess.run(command + (['--fp32'] if args.fp32 else []), capture_output=True, text=True, env=env,
                                check=True)
        rows[name] = tuple(float(v) for v in result.stdout.split('RESULT ')[-1].split())
    print(f'eager training step on the CPU, quarter widths, bs 2 at {args.size[0]}x{args.size[1]}, '
          f'{"fp32" if args.fp32 else "bf16 autocast"}, our Triton launches skipped')
    print('| model | best ms | median ms | our launches skipped | x Swin-T (median) | ATen operators | x Swin-T '
          '| Python calls | x Swin-T |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for name, (best, median, launches, operators, calls) in rows.items():
        swin = rows.get('Swin-T')
        ratios = [f'{mine / swin[i]:.2f}' if swin else '' for mine, i in ((median, 1), (operators, 3), (calls, 4))]
        print(f'| {name} | {best * 1e3:.1f} | {median * 1e3:.1f} | {launches:.0f} | {ratios[0]} | {operators:.0f} '
              f'| {ratios[1]} | {calls:.0f} | {ratios[2]} |')


if __name__ == '__main__':
    main()

"""Where a backbone's training step spends its time: wall time against GPU kernel time, and the top CUDA ops.

    python benchmarks/profile_step.py [--model T] [--swin] [--batch 128] [--size 224 224] [--rows 30]
                                      [--cuda-graph | --compile [MODE]] [--dynamic] [--compile-options JSON]
                                      [--drop-path-rate 0.2] [--take-turns DIR N] [--cprofile ROWS] [--inference]

GroupMamba of size ``--model`` (``--swin``: the Swin Transformer of that size), built as ``backbone_speed.py``
builds its rows (``build_backbones``), so that a compiled row finds the compile caches that run (or its warm-ups)
left: the same options and the same stochastic-depth rate (``backbone_speed.py`` builds its detection rows with
0.2, its classifiers with 0.1). ``--cuda-graph`` replays the step from CUDA graphs. ``--compile`` runs the
backbone through ``torch.compile`` (GroupMamba's ``compile`` option; default mode, or ``reduce-overhead`` ...;
static sizes unless ``--dynamic``; ``--compile-options`` as in ``backbone_speed.py``) and adds the host side: the
top CPU ops of the profiled step, and the launches in the wrappers Inductor generated for it, by kind (its
kernels by pointwise / reduction / persistent reduction, ours by name, library calls; ``wrapper_code.py``).

``--take-turns DIR N`` lets N such processes compile side by side and then time and profile one at a time: each
waits after its first step until all N have compiled, then holds a lock in DIR while it measures (a compile or a
timing beside a timing spoils it: benchmarks/README.md).

``--inference`` profiles ``backbone_speed.py``'s inference step instead (eval mode, no gradients, AMP fp16):
the forward alone, where the training step is forward and backward.

``--cprofile ROWS`` also lists, within the turn, the ROWS functions with the most own host time over three steps
(cProfile): for a compiled step, the wrappers' own Python against the launchers, tensor reinterpretations,
allocations and input checks they call.

A step whose wall time is well above its summed kernel time is bound by the host (Python, dispatch and
launches), not by the GPU. The kernels are also summed by family (hand-written Triton, Inductor's, GEMMs,
cuDNN, PyTorch's own elementwise, reduction and copy kernels, fills): launches and GPU time of each.
"""
import argparse
import collections
import cProfile
import fcntl
import io
import json
import logging
import os
import pstats
import re
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from backbone_speed import NAMES, backbone_step, build_backbones, inference_step, timed
from wrapper_code import launch_table, loaded_wrapper_modules, static_launch_table

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


class StaticLaunchBypasses(logging.Handler):
    """Collects Inductor's reasons for launching a kernel through Triton's launcher instead of its static one
    (logged at INFO where the parent process loads the kernel), while attached to Inductor's autotuner logger; that
    logger's records stop there meanwhile (its INFO lines would otherwise print through torch's handlers)."""

    LOGGER = 'torch._inductor.runtime.triton_heuristics'

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons = collections.Counter()

    def emit(self, record):
        message = record.getMessage()
        if message.startswith('Bypassing StaticallyLaunched'):
            self.reasons[message] += 1

    def __enter__(self):
        logger = logging.getLogger(self.LOGGER)
        self._saved = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


def announce_ready(directory):
    """Counts this process as compiled among those taking turns in ``directory`` (once per process)."""
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, f'ready.{os.getpid()}'), 'w').close()


def host_times(step, synchronize, repeats=5):
    """Milliseconds of host work of ``repeats`` steps, each started with the GPU idle and timed up to its last
    launch. One such step was the twenty-ninth session's host figure, and it came out above the same process's
    mean wall time (72.7 against 67.3 ms): a host-bound step's time varies from step to step, so several are
    timed and their spread printed."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    synchronize()
    return times


def host_functions(step, synchronize, rows, steps=3):
    """The ``rows`` functions that ``steps`` steps spend most host time in, by their own time (cProfile), as
    text. For a compiled step: the wrappers' ``call`` functions' own Python against what they call, each a
    function of its own (the launchers, ``reinterpret_tensor``, the allocations, the input checks), which the
    wrappers' statement counts (``compiled_kernels.py``) cannot weigh. cProfile adds its own cost to every
    Python call: compare the rows with each other and with another model's, not with the timed steps."""
    synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats('tottime').print_stats(rows)
    return text.getvalue()


def take_turn(directory, processes):
    """Waits until ``processes`` processes have announced themselves in ``directory``, then takes its lock: held
    until this process exits."""
    announce_ready(directory)
    while sum(name.startswith('ready.') for name in os.listdir(directory)) < processes:
        time.sleep(1)
    lock = open(os.path.join(directory, 'lock'), 'w')
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=sorted(NAMES), default='T', help='size: T, S or B')
    parser.add_argument('--swin', action='store_true', help='the Swin Transformer of that size instead')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224))
    parser.add_argument('--rows', type=int, default=30)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--cuda-graph', action='store_true')
    mode.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE')
    parser.add_argument('--dynamic', action='store_true')
    parser.add_argument('--compile-options', type=json.loads, default={})
    parser.add_argument('--drop-path-rate', type=float, default=0.2)
    parser.add_argument('--inference', action='store_true', help='the inference step (eval, no gradients)')
    parser.add_argument('--groupmamba-options', type=json.loads, default={},
                        help='GroupMamba constructor arguments, as in backbone_speed.py')
    parser.add_argument('--take-turns', nargs=2, metavar=('DIR', 'N'),
                        help='compile beside N-1 other processes given DIR, then measure one at a time')
    parser.add_argument('--cprofile', type=int, default=0, metavar='ROWS',
                        help='also list the ROWS functions with the most own host time over 3 steps (cProfile)')
    parser.add_argument('--sync-debug', action='store_true',
                        help='also list the operations of one step that wait for the GPU (set_sync_debug_mode)')
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    suffix = ' +graphs' if args.cuda_graph else ' +compile' if args.compile else ''
    options = dict(args.compile_options)
    if args.compile:
        options.setdefault('dynamic', args.dynamic)
        if args.compile != 'default':
            options.setdefault('mode', args.compile)
    name = f'{"Swin" if args.swin else "GroupMamba"}-{args.model}'
    model, _ = build_backbones([args.model], [suffix], args.drop_path_rate, options,
                               args.groupmamba_options)[name + suffix]
    model.cuda()
    images = torch.randn(args.batch, 3, *args.size, device='cuda')
    if args.inference:
        model.eval()
        step = inference_step(model, images)
    else:
        model.train()  # not chained: mmdet's SwinTransformer.train() returns None
        step = backbone_step(model, images)

    start = time.perf_counter()
    bypasses = StaticLaunchBypasses()
    try:
        with bypasses:
            step()
        torch.cuda.synchronize()
    except BaseException:
        # A process that fails to compile still counts as ready, so that the others time their turns instead of
        # waiting for it until the call's timeout (the twenty-seventh session's second call lost its whole trio).
        if args.take_turns:
            announce_ready(args.take_turns[0])
        raise
    print(f'first step (compiles with --compile) {time.perf_counter() - start:.1f} s', flush=True)
    if args.take_turns:
        turn = take_turn(args.take_turns[0], int(args.take_turns[1]))  # noqa: F841 (held until exit)
        print(f'{name}{suffix}: measuring from {time.strftime("%H:%M:%S")}', flush=True)
    # backbone_speed's timing: one full garbage collection before the timed steps (a compile leaves about a
    # million objects), and any collection inside them printed: two processes with the same compiled kernels
    # timed without it took 35.2 and 46.1 ms in one call (twenty-fourth session), and a collection of that garbage
    # inside the timed steps would cost about that much.
    wall_ms = timed(step, steps=10, warmup=3) * 1000
    host_steps_ms = host_times(step, torch.cuda.synchronize)
    if args.sync_debug:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            step()
            torch.cuda.set_sync_debug_mode('default')
        torch.cuda.synchronize()
        syncs = collections.Counter(f'{w.filename}:{w.lineno}: {w.message}' for w in caught
                                    if 'synchroniz' in str(w.message))
        print(f'operations waiting for the GPU in one step: {sum(syncs.values())}')
        for where, count in syncs.most_common(10):
            print(f'  {count} x {where}')

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
    if args.cprofile:
        print(f'{name}{suffix}: host time by function over 3 steps (cProfile, own time):')
        print(host_functions(step, torch.cuda.synchronize, args.cprofile))
    host_ms, low, high = statistics.median(host_steps_ms), min(host_steps_ms), max(host_steps_ms)
    # The compile settings on the result line: --compile alone compiles with static sizes (dynamic=False), where
    # the backbone's own compile option defaults to symbolic ones.
    setting = f' ({", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))})' if args.compile else ''
    what = ' inference' if args.inference else ''
    print(f'{name}{suffix}{setting}{what} batch {args.batch} {tuple(args.size)}: wall {wall_ms:.1f} ms/step, '
          f'host (launch) {host_ms:.1f} ms (median of {len(host_steps_ms)} steps, {low:.1f}-{high:.1f}), GPU kernels '
          f'{kernel_ms:.1f} ms in {launches} launches', flush=True)
    if args.take_turns:
        # With the start's line above, shows that the turns did not overlap (in the twenty-fourth session's call
        # they ran one after another, 1-2 s each).
        print(f'{name}{suffix}: measured until {time.strftime("%H:%M:%S")}', flush=True)
    if args.compile:
        # Last, after the measurements: it reads Inductor's code cache, private to PyTorch and not the same in every
        # release (the GPU image's is older than this project's), and must not cost the lines above.
        try:
            wrappers = loaded_wrapper_modules()
            table = launch_table([source for _, source in wrappers])
            static = static_launch_table([module for module, _ in wrappers])
        except (AttributeError, ImportError, ValueError) as error:
            table = static = f'not read: {type(error).__name__}: {error}'
        print('launches in the compiled wrappers (graphs in the order Inductor loaded them, forward first):')
        print(table)
        print('the wrappers\' Triton kernels by launcher (each kernel once, however often it launches):')
        print(static)
        for reason, count in bypasses.reasons.most_common():
            print(f'  {count} x {reason}')


if __name__ == '__main__':
    main()

"""Host time of one launch of our Triton kernels in eager code, layer by layer of the launch path, beside PyTorch's
own op for the same work.

    python benchmarks/launch_overhead.py [--calls 3000] [--repeats 5]

The eager training step is bound by its host (README, thirty-fifth session: 105-155 ms of host for 68 ms of
kernels at bs 128), and Triton's ``JITFunction.run`` with what it calls was 18 % of that step's profiled host
time, about 100 us a launch under cProfile. Whether a leaner launch of our kernels is worth building depends on
what each layer of the path costs without a profiler, which this measures on maps too small for the GPU to hold
the host back (each row also gives the GPU's own time per call, to show it does not). For each case (our
LayerNorm kernel and our depthwise conv + SiLU, as GroupMamba's stage 1 runs them, on a 2x8x8 map):

* ``torch``: PyTorch's op for the same work (``F.layer_norm``; the conv by ``F.conv2d`` + ``F.silu``, two launches);
* ``op``: our op as eager code calls it (``kernels.layer_norm``: the fused op's fast path, the dispatch between
  Triton and the reference, our launcher's tiling and allocations, then Triton's launch);
* ``launcher``: our launcher called directly (``triton_gated_norm.gated_norm_forward``,
  ``triton_dwconv.dwconv_act_forward``), with ``wrap_triton`` off as the op's fast path has it: its tiling,
  allocations and the arguments it builds, then Triton's launch. ``op`` less this row is the fused op's fast path
  and the dispatch; this row less ``jit run`` is the launcher's own work (thirty-sixth session: the two together
  cost 29-39 us a launch on an H100 host);
* ``jit run``: the same kernel through ``JITFunction.run`` alone, with the arguments our launcher passed, recorded
  once (Triton's argument binding and specialisation, its cache lookup, the launch);
* ``keyed run``: what a lean launch path of our own would pay: the arguments' specialisation recomputed in Python
  (:func:`specialization_key`: each tensor's dtype and 16-byte alignment, each integer's being 1, a multiple of
  16 and within 32 bits), the compiled kernel looked up by it in a dict, then launched as below;
* ``compiled run``: the kernel Triton compiled for those arguments, launched by its ``CompiledKernel.run`` with
  the arguments bound once (the driver's launch call alone: what a launch path that knew its kernel would pay).

Each row is the median over ``--repeats`` loops of ``--calls`` calls (host time: the loop's wall time with the GPU
synchronised before and after, divided by the calls), and the layers' differences are what the next step of the
path adds. The outputs of the paths that launch our kernel are checked against each other before timing.
"""
import argparse
import inspect
import statistics
import time

import torch
import torch.nn.functional as F
from torch._library.triton import set_wrap_triton_enabled
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from mmgroupmamba.kernels import depthwise_conv_act, layer_norm, triton_dwconv, triton_gated_norm


def record_launches(fn):
    """``(result, launches)``: ``fn()``'s result and the ``(kernel, args, kwargs, grid)`` of every Triton launch it
    made through ``JITFunction.run``."""
    launches = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), grid))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        result = fn()
    finally:
        JITFunction.run = original
    return result, launches


def bound_values(kernel, args, kwargs):
    """The values of all of ``kernel``'s parameters, constexprs included, in its signature's order (what
    ``JITFunction.run`` passes to the compiled kernel's launcher), from a launch's positional and keyword
    arguments; the launch options (``num_warps``, ...) are not parameters and are left out."""
    signature = inspect.signature(kernel.fn)
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def specialization_key(values, constexprs):
    """What Triton specialises a compiled kernel on, for argument values ``values``, as a hashable tuple: the
    values at the indices ``constexprs`` themselves; a tensor's dtype and whether its address is 16-byte aligned;
    an integer's being 1, a multiple of 16 and within 32 bits; a float by its type; bools, strings and None by
    themselves."""
    key = []
    for i, value in enumerate(values):
        if i in constexprs:
            key.append(value)
        elif isinstance(value, torch.Tensor):
            key.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            key.append((value == 1, value % 16 == 0, -2**31 <= value < 2**31))
        else:
            key.append(value if isinstance(value, (bool, str, type(None))) else type(value))
    return tuple(key)


def grid_3d(grid):
    return tuple(grid) + (1,) * (3 - len(grid))


class LaunchPaths:
    """The launch of one recorded kernel call by each layer of the path (see the module's docstring)."""

    def __init__(self, kernel, args, kwargs, grid):
        self.kernel, self.args, self.kwargs, self.grid = kernel, args, kwargs, grid
        self.compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        self.values = bound_values(kernel, args, kwargs)
        self.constexprs = frozenset(i for i, param in enumerate(kernel.params) if param.is_constexpr)
        self.keyed = {specialization_key(self.values, self.constexprs): self.compiled}
        self.stream = driver.active.get_current_stream(driver.active.get_current_device())

    def jit_run(self):
        self.kernel.run(*self.args, grid=self.grid, warmup=False, **self.kwargs)

    def keyed_run(self):
        c = self.keyed[specialization_key(self.values, self.constexprs)]
        g0, g1, g2 = grid_3d(self.grid)
        c.run(g0, g1, g2, self.stream, c.function, c.packed_metadata, None, None, None, *self.values)

    def compiled_run(self):
        g0, g1, g2 = grid_3d(self.grid)
        c = self.compiled
        c.run(g0, g1, g2, self.stream, c.function, c.packed_metadata, None, None, None, *self.values)


def host_us(fn, calls, repeats):
    """``(host us a call, GPU us a call)``: medians over ``repeats`` loops of ``calls`` calls."""
    host, gpu = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(host), statistics.median(gpu)


def cases(device):
    """``(name, our op, our launcher, PyTorch's op)`` on stage-1-like maps of 64 channels, 2x8x8, fp16; the launcher
    called as the op calls it, returning the op's output first."""
    x = torch.randn(2, 8, 8, 64, device=device, dtype=torch.float16)
    norm_weight = torch.randn(64, device=device)
    norm_bias = torch.randn(64, device=device)
    conv_weight = torch.randn(64, 1, 3, 3, device=device)
    conv_bias = torch.randn(64, device=device)
    x_nchw = x.permute(0, 3, 1, 2)
    conv_weight_h, conv_bias_h = conv_weight.half(), conv_bias.half()
    return [
        ('layer_norm (64 channels)', lambda: layer_norm(x, norm_weight, norm_bias, 1e-5),
         lambda: triton_gated_norm.gated_norm_forward(x, None, norm_weight, norm_bias, 1, 1e-5, x.dtype, 64)[0],
         lambda: F.layer_norm(x, (64, ), norm_weight.half(), norm_bias.half(), 1e-5)),
        ('depthwise conv + SiLU (64 channels)', lambda: depthwise_conv_act(x, conv_weight, conv_bias, 'silu'),
         lambda: triton_dwconv.dwconv_act_forward(x, conv_weight, conv_bias, 'silu'),
         lambda: F.silu(F.conv2d(x_nchw, conv_weight_h, conv_bias_h, padding=1, groups=64))),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--calls', type=int, default=3000)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('launch_overhead.py times CUDA launches: it needs a GPU')
    device = torch.device('cuda')
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}; host and GPU us a call, medians of '
          f'{args.repeats} x {args.calls} calls')
    print('| case | path | host us | GPU us | host us of this layer (this row less the next) |')
    print('| --- | --- | ---: | ---: | ---: |')
    # wrap_triton off for every row, as the op's fast path turns it off for its launcher (the op row pays for that
    # switch itself): the launcher row then launches as it does inside the op.
    with torch.no_grad(), set_wrap_triton_enabled(False):
        for name, ours, launcher, theirs in cases(device):
            expected, launches = record_launches(ours)
            if len(launches) != 1:
                raise RuntimeError(f'{name}: expected one Triton launch, recorded {len(launches)}')
            paths = LaunchPaths(*launches[0])
            torch.testing.assert_close(launcher(), expected, rtol=0, atol=0, msg=f'{name}: launcher')
            # The recorded launch writes into the op's output buffer: zeroed, then written again by each path,
            # it must equal a fresh call of the op.
            for check in (paths.jit_run, paths.keyed_run, paths.compiled_run):
                expected.zero_()
                check()
                torch.testing.assert_close(expected, ours(), rtol=0, atol=0, msg=f'{name}: {check.__name__}')
            rows = [('torch', theirs), ('op', ours), ('launcher', launcher), ('jit run', paths.jit_run),
                    ('keyed run', paths.keyed_run), ('compiled run', paths.compiled_run)]
            timed = [(path, *host_us(fn, args.calls, args.repeats)) for path, fn in rows]
            print(f'| {name} | torch | {timed[0][1]:.1f} | {timed[0][2]:.1f} | |')
            # From the op down, each row strips one layer off the path: what that layer cost.
            for i, (path, host, gpu) in enumerate(timed[1:], 1):
                layer = f'{host - timed[i + 1][1]:.1f}' if i + 1 < len(timed) else f'{host:.1f} (the launch)'
                print(f'| {name} | {path} | {host:.1f} | {gpu:.1f} | {layer} |')


if __name__ == '__main__':
    main()

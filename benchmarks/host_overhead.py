"""Where the host time of a GroupMamba step goes, for a step the GPU waits on its host for.

    python benchmarks/host_overhead.py [--rows 30] [--device cuda] [--ops-only]

1. Host cost per call (µs) of each fused op against plain PyTorch ops, forward alone and forward + backward,
   on tensors small enough that the GPU never holds the host back (fewer calls than the launch queue). For the
   fused ops (and a block), both ways of calling them: the eager fast path that runs their implementations
   directly (what eager code gets), and through the dispatcher, every fused op called as its custom op.
2. The Python functions (and C functions called from Python) that one detection-size training step
   (bs 2, 800x1344, AMP fp16, forward + backward) spends its host time in: cProfile, by own time.
"""
import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from backbone_speed import backbone_step
from mmgroupmamba import GroupMamba
from mmgroupmamba.kernels import depthwise_conv_act, gated_group_norm, layer_norm, modulated_layer_norm, selective_scan
from mmgroupmamba.kernels.ops_util import FusedOp
from mmgroupmamba.models.groupmamba import GroupMambaBlock


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def host_us(fn, device, calls=200):
    for _ in range(5):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    sync(device)
    return host


@contextlib.contextmanager
def through_dispatcher():
    """Every fused op called as its custom op, through the dispatcher, as every call went before the eager
    fast path: its backward ops too, which a fused op's own ``.op`` alone would still call the fast way."""
    fast_call = FusedOp.__call__
    FusedOp.__call__ = lambda self, *args: self.op(*args)
    try:
        yield
    finally:
        FusedOp.__call__ = fast_call


def op_costs(op, device, calls):
    """Host µs of ``op()`` without grad, and of ``op()`` and its backward."""
    with torch.no_grad():
        forward = host_us(op, device, calls)

    def train_step():
        out = op()
        out.backward(torch.ones_like(out))

    return forward, host_us(train_step, device, max(10, calls // 4))


def per_op_costs(device, calls):
    torch.manual_seed(0)
    b, h, w, c = 2, 8, 8, 64

    def t(*shape, grad=True):
        return torch.randn(*shape, device=device).requires_grad_(grad)

    x, z, y = t(b, h, w, c), t(b, h, w, c), t(b, h, w, c)
    u, delta, bc = t(b, h * w, c), t(b, h * w, c), t(b, h * w, 8)
    weight, bias, A_logs, D, dbias = t(c), t(c), t(c), t(c), t(c)
    conv_w, conv_b, lin_w = t(c, 1, 3, 3), t(c), t(c, c)
    scale = t(b, c)
    block = GroupMambaBlock(c, 4).to(device).train()
    plain_ops = {
        'torch.add': lambda: x + z,
        'F.linear': lambda: F.linear(x, lin_w),
        'F.layer_norm (PyTorch)': lambda: F.layer_norm(x, (c,), weight, bias),
    }
    fused_ops = {
        'layer_norm (Triton)': lambda: layer_norm(x, weight, bias, 1e-5),
        'gated_group_norm': lambda: gated_group_norm(y, z, weight, bias, 4, 1e-5),
        'modulated_layer_norm': lambda: modulated_layer_norm(y, x, scale, weight, bias, 1e-5),
        'depthwise_conv_act': lambda: depthwise_conv_act(x, conv_w, conv_b, 'silu'),
        'selective_scan': lambda: selective_scan(u, delta, A_logs, bc[..., :4], bc[..., 4:], D, dbias, (h, w)),
        'GroupMambaBlock (dims 64)': lambda: block(x),
    }
    print(f'| op ({b}x{h}x{w}x{c}) | forward µs | forward + backward µs | through the dispatcher: forward µs '
          '| forward + backward µs |')
    print('| --- | --- | --- | --- | --- |')
    for name, op in plain_ops.items():
        forward, both = op_costs(op, device, calls)
        print(f'| {name} | {forward:.1f} | {both:.1f} | | |', flush=True)
    for name, op in fused_ops.items():
        forward, both = op_costs(op, device, calls)
        with through_dispatcher():
            op_forward, op_both = op_costs(op, device, calls)
        print(f'| {name} | {forward:.1f} | {both:.1f} | {op_forward:.1f} | {op_both:.1f} |', flush=True)


def profile_step(device, rows):
    model = GroupMamba(arch='tiny', drop_path_rate=0.2).to(device).train()
    step = backbone_step(model, torch.randn(2, 3, 800, 1344, device=device))

    for _ in range(3):
        step()
    print('\n| detection-size step (bs 2, 800x1344, AMP, fwd + bwd) | host ms | wall ms |')
    print('| --- | --- | --- |')
    for name, calls in (('eager fast path', contextlib.nullcontext), ('through the dispatcher', through_dispatcher)):
        with calls():
            step()  # the first step after a switch allocates anew
            sync(device)
            start = time.perf_counter()
            for _ in range(5):
                step()
            host = time.perf_counter() - start  # the last launch returned; the GPU may still be busy
            sync(device)
            wall = time.perf_counter() - start
        print(f'| {name} | {host * 200:.1f} | {wall * 200:.1f} |', flush=True)  # ms per step of 5
    sync(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    step()
    profiler.disable()
    host_ms = (time.perf_counter() - start) * 1000
    sync(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats('tottime').print_stats(rows)
    print(f'\ndetection-size step, host {host_ms:.1f} ms under cProfile; top functions by own time:')
    print(text.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=30)
    parser.add_argument('--calls', type=int, default=200)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--ops-only', action='store_true',
                        help='section 1 alone (on a CPU, the detection-size step of section 2 takes minutes)')
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == 'cuda':
        print(torch.cuda.get_device_name(), 'torch', torch.__version__)
    per_op_costs(device, args.calls)
    if not args.ops_only:
        profile_step(device, args.rows)


if __name__ == '__main__':
    main()

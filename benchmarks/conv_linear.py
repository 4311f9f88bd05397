"""Check and time the FFN's depthwise conv + GELU fused into fc2 (one launch) against the current two launches.

    python benchmarks/conv_linear.py [--shapes s1 s2 s3 s4 det1 det2 det3] [--dtype fp16] [--sweep]

For GroupMamba-T's FFN shapes (bs 128 at 224x224, and the detection step's three largest maps, bs 2 at
800x1344), in fp16 by default: the current forward, ``triton_dwconv.dwconv_act_forward(h, ...)`` (writes the
activated hidden map) then cuBLAS's ``F.linear`` (reads it back), against
``triton_conv_linear.conv_gelu_linear_forward``, which never stores that map. Each shape is first checked: the
fused output against the current one (max abs and relative error; the script exits with an error beyond the
tolerance). Then each design is captured ``--graph-ms`` worth of calls into a ``torch.cuda.CUDAGraph`` and the
graphs are replayed in turns (a round replays each once, the order alternating between rounds), timed with CUDA
events; the table gives the median over ``--rounds`` rounds per call: the conv alone, the linear layer alone
(reading a stored map), both (the current path), the fused kernel, and a copy of the hidden map, whose bytes
(read + write) equal those the current path spends on the activation (written by the conv, read by the linear
layer): the copy's time is what the fusion can save at the card's copy bandwidth. ``--sweep`` also times a grid
of tilings of the fused kernel per shape (the defaults: triton_conv_linear.choose_tiles).
"""
import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F
from torch._library.triton import set_wrap_triton_enabled

from mmgroupmamba.kernels.ops_util import next_power_of_2
from mmgroupmamba.kernels.triton_conv_linear import choose_tiles, conv_gelu_linear_forward
from mmgroupmamba.kernels.triton_dwconv import dwconv_act_forward

SHAPES = {  # name: (batch, H, W, hidden channels K, output channels N) of GroupMamba-T's FFNs
    's1': (128, 56, 56, 512, 64), 's2': (128, 28, 28, 1024, 128), 's3': (128, 14, 14, 1392, 352),
    's4': (128, 7, 7, 1792, 448),
    'det1': (2, 200, 336, 512, 64), 'det2': (2, 100, 168, 1024, 128), 'det3': (2, 50, 84, 1392, 352),
}
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
# Fused against current: both round the same fp32 conv to the map's dtype (the order of its sums may move an
# element by one unit in the last place) and the fp32 matmul once; a few units of the dtype's epsilon at the
# output's scale, and a small relative (norm) error.
MAX_ABS_EPS = 4
MAX_REL_ERR = 2e-3


def log(*args):
    print(*args, flush=True)


def make_inputs(batch, height, width, hidden, out_features, dtype, seed=0):
    """h as fc1's output would be; the conv's parameters fp32 (autocast keeps them so); fc2's in h's dtype."""
    gen = torch.Generator(device='cuda').manual_seed(seed)
    h = torch.randn(batch, height, width, hidden, generator=gen, device='cuda').to(dtype)
    conv_weight = torch.randn(hidden, 1, 3, 3, generator=gen, device='cuda') * 0.3
    conv_bias = torch.randn(hidden, generator=gen, device='cuda') * 0.1
    fc2_weight = (torch.randn(out_features, hidden, generator=gen, device='cuda') * hidden ** -0.5).to(dtype)
    fc2_bias = (torch.randn(out_features, generator=gen, device='cuda') * 0.02).to(dtype)
    return h, conv_weight, conv_bias, fc2_weight, fc2_bias


def current_path(h, conv_weight, conv_bias, fc2_weight, fc2_bias):
    return F.linear(dwconv_act_forward(h, conv_weight, conv_bias, 'gelu'), fc2_weight, fc2_bias)


def check(name, args):
    """Max abs and relative error of the fused output against the current path's; exits beyond tolerance."""
    expected = current_path(*args).float()
    out = conv_gelu_linear_forward(*args).float()
    max_abs = (out - expected).abs().max().item()
    rel = ((out - expected).norm() / expected.norm()).item()
    bound = MAX_ABS_EPS * torch.finfo(args[0].dtype).eps * max(1.0, expected.abs().max().item())
    if not (max_abs <= bound and rel <= MAX_REL_ERR):
        sys.exit(f'FAILED {name}: fused vs current max abs error {max_abs:.3e} (bound {bound:.3e}), relative '
                 f'{rel:.3e} (bound {MAX_REL_ERR:.0e})')
    return max_abs, rel


def capture(fn, calls):
    """A CUDA graph of ``calls`` calls of ``fn`` (warmed up on a side stream first, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def replay_ms(graphs, calls, rounds):
    """Median ms per call of each graph of ``calls`` calls, over ``rounds`` rounds of one replay each, the
    graphs taking turns (reversed every other round, so that no design always follows the same one)."""
    times = {name: [] for name in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for graph in graphs.values():
        graph.replay()  # the first replay uploads the graph
    for round_ in range(rounds):
        order = list(graphs) if round_ % 2 == 0 else list(reversed(graphs))
        for name in order:
            start.record()
            graphs[name].replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def calls_for(fn, graph_ms):
    """How many calls of ``fn`` fill about ``graph_ms`` of GPU time (one graph): 2 to 500."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    return max(2, min(500, round(graph_ms / (start.elapsed_time(end) / 3))))


def time_designs(designs, graph_ms, rounds):
    calls = {name: calls_for(fn, graph_ms) for name, fn in designs.items()}
    graphs = {name: capture(fn, calls[name]) for name, fn in designs.items()}
    result = replay_ms(graphs, calls, rounds)
    del graphs
    torch.cuda.empty_cache()
    return result


def sweep_tilings(out_features):
    """The fused kernel's tilings to try for N output channels: pixels, an N tile covering N or half of it,
    hidden-channel chunk, warps, pipeline stages."""
    full = max(16, next_power_of_2(out_features))
    block_ns = (full, full // 2) if full >= 256 else (full,)
    for block_m, block_n, block_k, num_warps, stages in itertools.product((64, 128), block_ns, (16, 32), (4, 8),
                                                                          (1, 2)):
        yield dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, stages=stages)


def sweep(name, args, graph_ms, rounds):
    """Time every tiling of :func:`sweep_tilings` that compiles and runs (some exceed the registers or the shared
    memory), each checked first; print each, then the fastest."""
    h, _, _, fc2_weight, _ = args
    results = []
    for tiling in sweep_tilings(fc2_weight.shape[0]):
        try:
            out = conv_gelu_linear_forward(*args, **tiling)
            torch.cuda.synchronize()
        except Exception as error:  # a tiling the card cannot run (registers, shared memory) is skipped, and said so
            log(f'    {tiling}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:100]})')
            continue
        expected = current_path(*args)
        err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        if err > MAX_REL_ERR:
            sys.exit(f'FAILED {name} {tiling}: relative error {err:.2e}')
        ms = time_designs({'fused': lambda tiling=tiling: conv_gelu_linear_forward(*args, **tiling)}, graph_ms,
                          rounds)['fused']
        results.append((ms, tiling))
        log(f'    {tiling}: {ms:.4f} ms')
    if results:
        best_ms, best = min(results, key=lambda r: r[0])
        log(f'    best for {name}: {best_ms:.4f} ms with {best}; default {choose_tiles(h, fc2_weight.shape[0])}')


def run(args):
    dtype = DTYPES[args.dtype]
    log(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} maps, CUDA-graph replays: '
        f'median of {args.rounds} rounds, about {args.graph_ms} ms a graph')
    log('| shape | B x H x W x K -> N | max abs err | rel err | conv ms | linear ms | conv + linear ms | fused ms '
        '| speedup | act map write + read MB | map copy ms | copy GB/s | fused tiles (m, n, k, warps, stages) |')
    log('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |')
    for name in args.shapes:
        log(shape_row(name, dtype, args))
        torch.cuda.empty_cache()  # the shape's maps are gone: their memory goes back before the next shape's
    if args.sweep:  # after the table, which its lines would cut
        for name in args.shapes:
            log(f'sweep of {name}:')
            sweep(name, make_inputs(*SHAPES[name], dtype), args.graph_ms, args.rounds)
            torch.cuda.empty_cache()


def shape_row(name, dtype, args):
    """Check and time one shape; its table row."""
    batch, height, width, hidden, out_features = SHAPES[name]
    inputs = make_inputs(batch, height, width, hidden, out_features, dtype)
    h, conv_weight, conv_bias, fc2_weight, fc2_bias = inputs
    max_abs, rel = check(name, inputs)
    stored = dwconv_act_forward(h, conv_weight, conv_bias, 'gelu')  # the linear layer's input, timed alone
    copy = torch.empty_like(h)
    ms = time_designs({
        'conv': lambda: dwconv_act_forward(h, conv_weight, conv_bias, 'gelu'),
        'linear': lambda: F.linear(stored, fc2_weight, fc2_bias),
        'current': lambda: current_path(*inputs),
        'fused': lambda: conv_gelu_linear_forward(*inputs),
        'copy': lambda: copy.copy_(h),
    }, args.graph_ms, args.rounds)
    map_bytes = h.numel() * h.element_size()  # the activated map has h's size and dtype
    return (f'| {name} | {batch}x{height}x{width}x{hidden} -> {out_features} | {max_abs:.2e} | {rel:.2e} '
            f'| {ms["conv"]:.4f} | {ms["linear"]:.4f} | {ms["current"]:.4f} | {ms["fused"]:.4f} '
            f'| {ms["current"] / ms["fused"]:.2f}x | {2 * map_bytes / 1e6:.0f} | {ms["copy"]:.4f} '
            f'| {2 * map_bytes / (ms["copy"] * 1e-3) / 1e9:.0f} | {choose_tiles(h, out_features)} |')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument('--dtype', choices=list(DTYPES), default='fp16')
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--graph-ms', type=float, default=10.0, help='GPU time each captured graph covers')
    parser.add_argument('--sweep', action='store_true', help="also time a grid of the fused kernel's tilings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('benchmarks/conv_linear.py needs a CUDA GPU (none is visible).', file=sys.stderr)
        sys.exit(1)
    # The launchers are called directly, outside the custom ops: launch as the ops' eager path does, without
    # torch.library's tracing wrapper around each launch.
    with set_wrap_triton_enabled(False):
        run(args)


if __name__ == '__main__':
    main()

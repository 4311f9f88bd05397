"""Check and time the norm kernels on a GPU against copy bandwidth, at GroupMamba-T's shapes.

    python benchmarks/norm_kernels.py [--sweep] [--sweep-shapes 'det s3' 'det s4' ...]

Each block runs three norms, each forward and backward (the backward also recomputing the output for the
linear layer after it, as the fused layers ask):

* ``layer``: the LayerNorm of the layer's input and of the FFN's (one group, no gate): fp32 residual stream
  in, fp16 out;
* ``gated``: the scan groups' ``out_norm`` (4 groups, each over C/4 channels) times SiLU of the gate ``z``, a
  column slice of the input projection's output; fp16;
* ``modulated``: LayerNorm of ``y * x * scale`` (the channel-affinity modulation), fp16;
* ``residual``: the LayerNorm that does a residual add in its pass (``x + branch * keep``, stochastic depth's
  per-image scale; the sum written too), and whose backward adds the sum's gradient from the next add and writes
  the branch's; fp16. It replaces a ``layer`` norm and an ``addcmul`` (the add's pass, and two backward ones).

For stages 1-4 at bs 128, 224x224 (``cls``) and at the detection step's bs 2, 800x1344 (``det``): the
largest error against the PyTorch reference (fp32, two images' rows), then the forward and the backward
launchers replayed from CUDA graphs (``do_bench_cudagraph``: the kernels alone), and their minimal bytes
(each map read or written once; statistics and partial sums not counted) over that time as a fraction of copy
bandwidth. ``--sweep`` also times tilings (rows per tile, warps, groups per program and, backward, row tiles
per program) at the shapes named.
Stage 3's maps are stored as the model stores them (348 channels as 352, ``kernels/layout.py``); until the
twenty-seventh session this script timed them compact, a layout the model does not run (the gated norm there ran
at 17 % of bandwidth forward, misaligned 87-channel groups).
The profile of the compiled detection step (tenth session) had one gated-norm kernel of stage 3 at 84 us
forward and 123 us backward, eight times the stage's LayerNorm of the same size: this finds which shape and
tiling.
"""
import argparse
import itertools

import torch
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench_cudagraph

from mmgroupmamba.kernels.gated_norm import residual_sum_reference
from mmgroupmamba.kernels.layout import pad_groups, stored_channels, unpad_groups
from mmgroupmamba.kernels.reference import group_layer_norm_reference, modulated_layer_norm_reference
from mmgroupmamba.kernels.triton_gated_norm import (
    gated_norm_backward,
    gated_norm_forward,
    modulated_norm_backward,
    modulated_norm_forward,
    residual_norm_backward,
    residual_norm_forward,
)
from scan_kernels import copy_bandwidth, log, rel_err

DIMS = (64, 128, 348, 448)  # GroupMamba-T's channels per stage
MAPS = {'cls': [(128, s, s) for s in (56, 28, 14, 7)], 'det': [(2, h, w) for h, w in
                                                              ((200, 336), (100, 168), (50, 84), (25, 42))]}
KINDS = ('layer', 'gated', 'modulated', 'residual')
# Bytes per element, minimal: forward (reads + writes), backward (reads dout and the inputs, writes the
# input gradients and the recomputed output).
BYTES = {'layer': (4 + 2, 2 + 4 + 4 + 2), 'gated': (2 + 2 + 2, 2 + 2 + 2 + 2 + 2 + 2),
         'modulated': (2 + 2 + 2, 2 + 2 + 2 + 2 + 2 + 2), 'residual': (2 + 2 + 2 + 2, 2 + 2 + 2 + 2 + 2 + 2)}
SWEEP = dict(block_n=(None, 4, 8, 16, 32), num_warps=(4, 8), groups_per_program=(1, 2, 4), tiles_per_program=(1, 4, 16))


def make(kind, batch, height, width, channels):
    """The launchers' inputs and two closures: ``forward()``, ``backward()``, each taking tiling keywords. The maps
    hold ``channels`` stored as the model stores them (``stored_channels``: 348 as 352, zeros in the pad columns);
    the weights, biases and scales are compact, as the model passes them."""
    stored = stored_channels(channels)

    def random_map(dtype=torch.float16):
        return pad_groups(torch.randn(batch, height, width, channels, device='cuda', dtype=dtype), stored)

    weight, bias = torch.randn(channels, device='cuda'), torch.randn(channels, device='cuda')
    dout = random_map()
    if kind == 'modulated':
        y, x = random_map(), random_map()
        scale = torch.rand(batch, channels, device='cuda')
        stats = modulated_norm_forward(y, x, scale, weight, bias, 1e-5)[1:]
        return ((y, x, scale, weight, bias),
                lambda **t: modulated_norm_forward(y, x, scale, weight, bias, 1e-5, **t),
                lambda **t: modulated_norm_backward(dout, y, x, scale, weight, bias, *stats, True, **t))
    if kind == 'residual':
        x, branch = random_map(), random_map()
        keep = (torch.rand(batch, device='cuda') > 0.1).float() / 0.9
        _, total, *stats = residual_norm_forward(x, branch, keep, weight, bias, 1e-5, torch.float16)
        dtotal = random_map()
        return ((x, branch, keep, weight, bias),
                lambda **t: residual_norm_forward(x, branch, keep, weight, bias, 1e-5, torch.float16, **t),
                lambda **t: residual_norm_backward(dout, dtotal, total, keep, weight, bias, *stats, torch.float16,
                                                   torch.float16, True, **t))
    if kind == 'layer':
        y, z, groups = random_map(torch.float32), None, 1
    else:
        y = random_map()
        z = torch.cat([random_map(), random_map()], dim=-1)[..., stored:]  # the gate: a column slice, as in the model
        groups = 4
    stats = gated_norm_forward(y, z, weight, bias, groups, 1e-5, torch.float16)[1:]
    return ((y, z, weight, bias, groups),
            lambda **t: gated_norm_forward(y, z, weight, bias, groups, 1e-5, torch.float16, **t),
            lambda **t: gated_norm_backward(dout, y, z, weight, bias, *stats, groups, torch.float16, True, **t))


def forward_error(kind, inputs, out):
    """The forward's largest relative error against the reference, over the first two images' valid channels."""
    if kind == 'modulated':
        y, x, scale, weight, bias = inputs
    elif kind == 'residual':
        x, branch, keep, weight, bias = inputs
    else:
        y, z, weight, bias, groups = inputs

    def compact(t):
        return unpad_groups(t[:2], weight.numel())

    if kind == 'modulated':
        ref = modulated_layer_norm_reference(compact(y).float(), compact(x).float(), scale[:2], weight, bias, 1e-5)
    elif kind == 'residual':
        total = residual_sum_reference(compact(x), compact(branch), keep[:2]).float()  # the sum rounded as stored
        ref = group_layer_norm_reference(total, None, weight, bias, 1, 1e-5, torch.float32)
    else:
        ref = group_layer_norm_reference(compact(y).float(), None if z is None else compact(z).float(), weight,
                                         bias, groups, 1e-5, torch.float32)
    return rel_err(compact(out).float(), ref)


def replayed_ms(fn, **tiling):
    return do_bench_cudagraph(lambda: fn(**tiling), return_mode='median')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--sweep-shapes', nargs='+', default=['det s3', 'det s4', 'cls s3'])
    parser.add_argument('--sweep-kinds', nargs='+', default=list(KINDS), choices=KINDS,
                        help='the norms swept (each tiling compiles anew: a sweep of all four takes minutes)')
    args = parser.parse_args(argv)
    # The launchers are called directly, outside the ops: launch as the ops' eager path does, without
    # torch.library's tracing wrapper around each launch.
    with set_wrap_triton_enabled(False):
        run(args.sweep, args.sweep_shapes, args.sweep_kinds)


def run(sweep, sweep_shapes, sweep_kinds):
    bandwidth = copy_bandwidth()
    log(f'{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s')
    log('| norm | shape | B x H x W x C | max rel err (fwd) | fwd ms | fwd %BW | bwd ms | bwd %BW |')
    log('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for task, maps in MAPS.items():
        for stage, ((batch, height, width), channels) in enumerate(zip(maps, DIMS), 1):
            name = f'{task} s{stage}'
            for kind in KINDS:
                inputs, forward, backward = make(kind, batch, height, width, channels)
                err = forward_error(kind, inputs, forward()[0])
                elements = batch * height * width * stored_channels(channels)  # the bytes the stored maps move
                fwd, bwd = replayed_ms(forward), replayed_ms(backward)
                fwd_bw, bwd_bw = (n * elements / (ms * 1e-3) / bandwidth for n, ms in zip(BYTES[kind], (fwd, bwd)))
                layout = f'{batch}x{height}x{width}x{channels}'
                if stored_channels(channels) != channels:
                    layout += f' as {stored_channels(channels)}'
                log(f'| {kind} | {name} | {layout} | {err:.1e} | {fwd:.3f} | {fwd_bw:.0%} '
                    f'| {bwd:.3f} | {bwd_bw:.0%} |')
                if sweep and name in sweep_shapes and kind in sweep_kinds:
                    # Groups per program only where there are groups. Row tiles per program are the backward's
                    # alone: each forward tiling is timed once, its backward at each of them.
                    grid = {k: v for k, v in SWEEP.items()
                            if (kind == 'gated' or k != 'groups_per_program') and k != 'tiles_per_program'}
                    if kind == 'residual':  # one group; its launchers take rows per tile and warps
                        grid = {k: v for k, v in grid.items() if k in ('block_n', 'num_warps')}
                    walks = SWEEP['tiles_per_program']
                    for values in itertools.product(*grid.values()):
                        tiling = dict(zip(grid, values))
                        bwd = ' / '.join(f'{replayed_ms(backward, **tiling, tiles_per_program=t):.3f}' for t in walks)
                        log(f'    {kind} {name} {tiling}: fwd {replayed_ms(forward, **tiling):.3f} ms, '
                            f'bwd {bwd} ms at {" / ".join(map(str, walks))} tiles per program')
                del inputs, forward, backward
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()

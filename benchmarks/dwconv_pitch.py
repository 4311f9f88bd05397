"""The depthwise conv's backward pre-activation pass against the row pitch of the map it recomputes.

    python benchmarks/dwconv_pitch.py [--pads 8 16 64] [--device cuda]

The ones column (``ops_util.ONES_COLUMNS``) first came as 8 more columns after each pixel's C channels of the
FFN's recomputed hidden map: rows 2 * (C + 8) bytes apart, 1040 for C = 512. On an H100 the pass that writes that
map then took 92.1 us a launch against 80.8 without the column (forty-fourth session, det step, its 38 launches),
1.6 % more bytes for 14 % more time. The lead: at that pitch a program's 64-channel run (128 bytes) of a pixel
starts in the middle of a 32-byte sector for every other pixel, and the next channel block's program writes the
rest of that sector at another time. At C + 16 columns every run starts on a sector; at C + 64 on a 128-byte
line. Measured here (forty-fifth session, H100): C + 16 took 5 % off the pass at the det shapes and 10 % at bs
128, C + 64 nothing more, so the column is 16 wide now (README, forty-fifth session).

This script launches ``_dwconv_bwd_pre_kernel`` itself, at the launcher's tiling, writing the recomputed map with
``C + pad`` columns for each ``pad`` (its first column ones, the rest zeros, as the kernel writes them), and
without the map (the Mamba layer's conv, whose output no linear layer needs) as a floor. Each variant is first
checked against the launcher's own result (the pre-activation gradient bitwise, the map's channels and its
ones column), then timed as CUDA-graph replays (the kernels alone), at the detection step's FFN shapes (bs 2,
800x1344: stride-4 and stride-8 maps) and stage 1's FFN at bs 128, 224x224. Printed: ms a launch, and the
minimal bytes (read x and the output gradient, write the pre-activation gradient and the map with its columns)
over that time against a copy's bandwidth. On the CPU (``TRITON_INTERPRET=1``, ``--device cpu``) only the
checks run, at a small shape.
"""
import argparse
import os
import sys

import torch

SHAPES = [  # name, batch, H, W, hidden channels
    ('det s1 ffn', 2, 200, 336, 512), ('det s2 ffn', 2, 100, 168, 1024), ('s1 ffn bs128', 128, 56, 56, 512),
]
CPU_SHAPE = ('cpu check', 1, 5, 6, 24)


def launch(x, weight, bias, dout, pad):
    """``(d_pre, out)`` of one pre-activation pass with GELU at the launcher's tiling; ``out`` ``(B, H, W, C +
    pad)``, or None where ``pad`` is None (the map not written)."""
    from mmgroupmamba.kernels import triton_dwconv as conv
    from mmgroupmamba.kernels.ops_util import launchable

    batch, height, width, channels = x.shape
    d_pre = torch.empty_like(x)
    out = None if pad is None else torch.empty((batch, height, width, channels + pad), dtype=x.dtype,
                                               device=x.device)
    block_w, block_c, rows, num_warps, prefetch, stages = conv.choose_tiles(x, backward=True)
    n_cb, n_wb, n_rb, programs = conv._grid(x.shape, block_w, block_c, rows)
    part = torch.empty((10 * channels, programs // n_cb), dtype=torch.float32, device=x.device)
    launchable(conv._dwconv_bwd_pre_kernel)[(programs,)](
        x, conv._taps(weight), bias, dout, d_pre, d_pre if out is None else out, part, height, width, channels,
        n_cb, n_wb, n_rb, rows, x.stride(0), x.stride(1), x.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), ACT=conv._ACT_CODES['gelu'], NEED_OUT=out is not None, PREFETCH=prefetch, STAGES=stages,
        BLOCK_W=block_w, BLOCK_C=block_c, PAD=8 if pad is None else pad, num_warps=num_warps)
    return d_pre, out


def inputs(batch, height, width, channels, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, height, width, channels, device=device, generator=gen).half()
    dout = torch.randn(batch, height, width, channels, device=device, generator=gen).half()
    weight = torch.randn(channels, 1, 3, 3, device=device, generator=gen) * 0.3
    bias = torch.randn(channels, device=device, generator=gen) * 0.1
    return x, weight, bias, dout


def check(x, weight, bias, dout, pads):
    """Raises unless every variant's pre-activation gradient equals the launcher's bitwise and its map's channels
    equal the launcher's recomputed output, with a ones column and zeros after it."""
    from mmgroupmamba.kernels.ops_util import ONES_COLUMNS
    from mmgroupmamba.kernels.triton_dwconv import dwconv_act_backward

    channels = x.shape[-1]
    _, _, expected_out = dwconv_act_backward(dout, x, weight, bias, 'gelu', need_output=True)
    expected_pre, _ = launch(x, weight, bias, dout, ONES_COLUMNS)
    for pad in [None, *pads]:
        d_pre, out = launch(x, weight, bias, dout, pad)
        if not torch.equal(d_pre, expected_pre):
            raise AssertionError(f'pad {pad}: the pre-activation gradient differs from the launcher pitch\'s')
        if out is None:
            continue
        if not torch.equal(out[..., :channels], expected_out[..., :channels]):
            raise AssertionError(f'pad {pad}: the recomputed map differs from the launcher\'s')
        columns = torch.zeros(pad, dtype=out.dtype, device=out.device)
        columns[0] = 1
        if not torch.equal(out[..., channels:], columns.expand_as(out[..., channels:])):
            raise AssertionError(f'pad {pad}: the columns after the map are not a one and zeros')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pads', type=int, nargs='+', default=[8, 16, 64],
                        help='columns after the map (powers of 2: the kernel stores them as one tile)')
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    args = parser.parse_args(argv)
    if args.device == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        sys.exit('dwconv_pitch.py --device cpu: run it with TRITON_INTERPRET=1 (the kernel runs in Triton\'s '
                 'interpreter on the CPU)')
    from torch._library.triton import set_wrap_triton_enabled

    # The kernel is launched directly, as the ops' eager path launches it.
    with set_wrap_triton_enabled(False):
        if args.device == 'cpu':
            check(*inputs(*CPU_SHAPE[1:], 'cpu'), args.pads)
            print(f'checks passed on the CPU ({CPU_SHAPE[1:]}, pads {args.pads}); timings need a GPU')
            return
        run(args.pads)


def run(pads):
    from scan_kernels import copy_bandwidth

    bandwidth = copy_bandwidth()
    print(f'{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; fp16 maps, GELU; '
          'CUDA-graph replays, median ms a launch', flush=True)
    variants = [None, *pads]
    labels = ['no map'] + [f'C + {pad}' for pad in pads]
    print('| shape | B x H x W x C | ' + ' | '.join(f'{label} ms (% copy BW)' for label in labels) + ' |')
    print('| --- | --- | ' + ' | '.join('---:' for _ in labels) + ' |')
    for name, batch, height, width, channels in SHAPES:
        cells = time_shape(inputs(batch, height, width, channels, 'cuda'), variants, bandwidth, pads)
        print(f'| {name} | {batch}x{height}x{width}x{channels} | ' + ' | '.join(cells) + ' |', flush=True)
        torch.cuda.empty_cache()


def time_shape(tensors, variants, bandwidth, pads):
    """Each variant's cell for one shape, after the checks."""
    from triton.testing import do_bench_cudagraph

    check(*tensors, pads)
    size = tensors[0].numel() * tensors[0].element_size()
    channels = tensors[0].shape[-1]
    cells = []
    for pad in variants:
        ms = do_bench_cudagraph(lambda pad=pad: launch(*tensors, pad), return_mode='median')
        moved = 3 * size + (0 if pad is None else size * (channels + pad) // channels)
        cells.append(f'{ms:.3f} ({moved / (ms * 1e-3) / bandwidth:.0%})')
    return cells


if __name__ == '__main__':
    main()

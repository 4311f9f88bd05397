"""Time ways of reducing a linear layer's bias gradient (the column sums of its output gradient, in fp32).

    python benchmarks/bias_grad_sum.py [--device cuda] [--model tiny]

The fused pairs' backward (``kernels/fused_linear.py``, ``_linear_backward``) summed the fp16 output gradient
over its rows with ``sum(0, dtype=torch.float32)``. On an H100 those sums took 1.74 ms of the detection step's
27.5 ms of kernels (forty-second session, 57 launches = 19 blocks x proj, fc1, fc2) while reading about
1.2 GB: a fifth of copy bandwidth. This script's table (kernels/README.md, forty-third session) chose the ones
column, which ``_linear_backward`` now uses. The designs, each checked against the fp64 sum first, then timed as
CUDA-graph replays (the kernels alone), over the detection step's shapes (bs 2 at 800x1344, stride-4 maps of
200x336):

- ``torch_sum``: the former ``g.sum(0, dtype=torch.float32)``;
- ``compiled_sum``: the same line compiled by Inductor (``dynamic=False``), which writes its own reduction;
- ``ones_gemv``: ``ones(1, N) @ g`` in cuBLAS (fp16 result, fp32 accumulation: stock PyTorch's AMP linear
  returns its bias gradient in fp16 too);
- ``triton_colsum``: a program per block of rows and columns accumulating fp32 partial sums over its rows, then
  one ``sum(0)`` of the partials;
- ``gemm_ones_column``: what a ones column after the weight-gradient matmul's other operand would add to that
  matmul (padded by 8 columns for cuBLAS's alignment), as the matmul's time with it minus without it. The
  column itself would be written by the kernel that recomputes the operand, so it is not timed.

The table gives each design's total over the step's 57 sums and its bandwidth against a copy's. On the CPU
(``TRITON_INTERPRET=1``, ``--device cpu``) only the checks run, at small shapes.
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

from mmgroupmamba.kernels.ops_util import cdiv

# GroupMamba's stages at the detection step: (tokens, stored width, FFN ratio, blocks) per arch.
DET_TOKENS = (2 * 200 * 336, 2 * 100 * 168, 2 * 50 * 84, 2 * 25 * 42)
ARCHS = {'tiny': ((64, 8, 3), (128, 8, 4), (352, 4, 9), (448, 4, 3)),
         'small': ((64, 8, 3), (128, 8, 4), (352, 4, 16), (512, 4, 3)),
         'base': ((96, 8, 3), (192, 8, 6), (424, 4, 21), (512, 4, 3))}


def det_shapes(arch):
    """``[(rows, columns, inputs, count)]``: each bias gradient's output-gradient shape, its layer's input width
    and how often a step sums it."""
    shapes = []
    for tokens, (width, ratio, blocks) in zip(DET_TOKENS, ARCHS[arch]):
        hidden = width * ratio
        shapes += [(tokens, width, width, blocks), (tokens, hidden, width, blocks), (tokens, width, hidden, blocks)]
    return shapes  # proj, fc1, fc2 per stage


@triton.jit
def _column_partial_sums(g_ptr, out_ptr, rows, columns, rows_per_program,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = pid_r * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, rows), BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r[:, None] < rows) & (r[:, None] < first + rows_per_program) & (cols[None, :] < columns)
        acc += tl.load(g_ptr + r[:, None].to(tl.int64) * columns + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_r * columns + cols, tl.sum(acc, axis=0), mask=cols < columns)


def triton_colsum(g, programs=528, block_c=None):
    """Column sums of a contiguous 2-D ``g`` in fp32: partial sums over runs of rows, then their sum."""
    rows, columns = g.shape
    block_c = block_c or min(triton.next_power_of_2(columns), 128)
    block_r = max(4096 // block_c, 8)
    column_blocks = cdiv(columns, block_c)
    row_blocks = max(1, min(cdiv(rows, block_r), programs // column_blocks))
    rows_per_program = cdiv(cdiv(rows, row_blocks), block_r) * block_r
    row_blocks = cdiv(rows, rows_per_program)
    partial = torch.empty((row_blocks, columns), dtype=torch.float32, device=g.device)
    _column_partial_sums[(row_blocks, column_blocks)](g, partial, rows, columns, rows_per_program,
                                                      BLOCK_R=block_r, BLOCK_C=block_c)
    return partial.sum(0)


def torch_sum(g):
    return g.sum(0, dtype=torch.float32)


def ones_gemv(g, ones):
    return (ones @ g).view(-1)


def designs(device):
    compiled = torch.compile(torch_sum, dynamic=False) if device == 'cuda' else None
    out = {'torch_sum': lambda g, ones: torch_sum(g), 'ones_gemv': ones_gemv,
           'triton_colsum': lambda g, ones: triton_colsum(g)}
    if compiled is not None:
        out['compiled_sum'] = lambda g, ones: compiled(g)
    return out


def check(device, dtype, shapes):
    """Largest relative error of each design against the fp64 sum, over ``shapes``."""
    worst = {}
    gen = torch.Generator(device='cpu').manual_seed(0)
    for rows, columns, *_ in shapes:
        g = torch.randn(rows, columns, generator=gen).to(device=device, dtype=dtype)
        ones = torch.ones(1, rows, dtype=dtype, device=device)
        exact = g.double().sum(0)
        for name, fn in designs(device).items():
            err = ((fn(g, ones).double() - exact).norm() / exact.norm()).item()
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


def time_graph(fn):
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=100, return_mode='median')


def bench(arch):
    from scan_kernels import copy_bandwidth
    bandwidth = copy_bandwidth()
    shapes = det_shapes(arch)
    total_bytes = sum(rows * columns * 2 * count for rows, columns, _, count in shapes)
    totals = {}
    print(f'{"rows":>7} {"cols":>5} {"count":>5} ' + ' '.join(f'{n:>16}' for n in designs('cuda')) +
          f' {"gemm_ones_column":>16}   (ms per sum)')
    for rows, columns, inputs, count in shapes:
        g = torch.randn(rows, columns, dtype=torch.float16, device='cuda')
        ones = torch.ones(1, rows, dtype=torch.float16, device='cuda')
        row = []
        for name, fn in designs('cuda').items():
            ms = time_graph(lambda: fn(g, ones))
            totals[name] = totals.get(name, 0.0) + ms * count
            row.append(ms)
        # The weight-gradient matmul's other operand: the op's recomputed output (the linear layer's input).
        operand = torch.randn(rows, inputs, dtype=torch.float16, device='cuda')
        padded = torch.randn(rows, inputs + 8, dtype=torch.float16, device='cuda')
        extra = time_graph(lambda: g.t() @ padded) - time_graph(lambda: g.t() @ operand)
        totals['gemm_ones_column'] = totals.get('gemm_ones_column', 0.0) + extra * count
        row.append(extra)
        print(f'{rows:>7} {columns:>5} {count:>5} ' + ' '.join(f'{ms:>16.4f}' for ms in row))
    print(f'\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; the step\'s sums read {total_bytes / 1e9:.2f} GB')
    print(f'{"design":>18} {"ms per step":>12} {"of copy bw":>11}')
    for name, ms in totals.items():
        share = '' if name == 'gemm_ones_column' else f'{total_bytes / (ms * 1e-3) / bandwidth:>10.0%}'
        print(f'{name:>18} {ms:>12.3f} {share:>11}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--model', default='tiny', choices=sorted(ARCHS))
    args = parser.parse_args()
    if args.device == 'cpu':
        if os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('bias_grad_sum.py --device cpu runs the Triton kernel interpreted: set TRITON_INTERPRET=1')
        errors = check('cpu', torch.float32, [(1000, 64, 64, 1), (37, 200, 8, 1), (4096, 24, 8, 1)])
    else:
        errors = check('cuda', torch.float16, det_shapes(args.model))
    print('largest relative error against the fp64 sum: ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
    if max(errors.values()) > 1e-3:
        sys.exit('a design is wrong: not timed')
    if args.device == 'cuda':
        bench(args.model)


if __name__ == '__main__':
    main()

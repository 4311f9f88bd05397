"""GPU: the matmuls of one GroupMambaBlock per stage, timed with the stage's channel count as it is and padded to
a multiple of 8, with the kernel cuBLAS picks for each.

    python benchmarks/gemm_alignment.py [--arch tiny] [--batch 128] [--size 224 224] [--dtype fp16]

Why: stage 3 of GroupMamba-T and -S has 348 channels. A row of a ``(M, 348)`` fp16 matrix is 696 bytes, so
every other row starts 8 bytes off 16-byte alignment, and cuBLAS's Hopper kernels want 16-byte aligned leading
dimensions. A graphed bs-128 step of GroupMamba-T on an H200 (fifteenth session, README) spent most of its
22.3 ms of GEMMs in CUTLASS sm80 kernels (``cutlass_80_tensorop_f16_s16816gemm``), many in launch counts that
are multiples of stage 3's nine blocks. On the H200 (sixteenth session) padding the channels to 352 moved them
to Hopper's kernels, 2.7x faster in all, while padded rows with 348 channels did not: cuBLAS wants K and N
themselves multiples of 8, so stage 3 has to carry 352 channels through its matmuls, not only padded rows.

Two ways to give cuBLAS aligned rows are timed beside the matmuls as they are: ``padded to 8``, the channels
themselves padded (K and N rounded up, extra zero channels the model would have to carry through its norms,
convs and scan), and ``rows padded``, the same K and N with every matrix a view of a buffer whose rows are
padded (a row stride of 352 elements for 348 channels; the outputs written into such views with ``out=``):
what the model would get by allocating its maps with padded rows and leaving their channels as they are.

Each matmul of the block, as the model runs it (the groups' projections as one dense block-diagonal matrix,
``GroupMambaLayer.projections``), is timed forward (``x @ W^T``) and for both backward products (``grad @ W``,
``grad^T @ x``): median ms of ``triton.testing.do_bench``, the host's time to issue one call (``host us``: 50
calls issued back to back from an idle GPU, fewer than its launch queue holds, so the host does not wait:
an eager step is bound by its host, and the padded stage's eager step took its host about a tenth longer,
nineteenth session), then the kernels one call launched (torch.profiler, after every timing: a trace can tax
later launches, ``profiler_tax.py``).
"""
import argparse
import math
import sys
import time

import torch

from mmgroupmamba.models.groupmamba import ARCH_SETTINGS, NUM_GROUPS

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def padded(n, multiple=8):
    return math.ceil(n / multiple) * multiple


def block_matmuls(arch, batch, size):
    """``[(stage, name, M, K, N)]``: the matmuls ``(M, K) @ (K, N)`` of one block's forward per stage, with M the
    positions of a batch at that stage (the map is 1/4 of the image after the stem, then halved per stage)."""
    settings = ARCH_SETTINGS[arch]
    rows = []
    for stage, (dims, ratio) in enumerate(zip(settings['embed_dims'], settings['mlp_ratios']), start=1):
        scale = 4 * 2 ** (stage - 1)
        positions = batch * math.ceil(size[0] / scale) * math.ceil(size[1] / scale)
        hidden = int(dims * ratio)
        for name, k, n in (('in_proj', dims, 2 * dims), ('delta_bc_proj', dims, dims + 2 * NUM_GROUPS),
                           ('out_proj', dims, dims), ('proj', dims, dims), ('fc1', dims, hidden),
                           ('fc2', hidden, dims)):
            rows.append((stage, name, positions, k, n))
    return rows


def products(m, k, n, dtype, device):
    """The three products of a linear layer ``(M, K) -> (M, N)``: forward, input gradient, weight gradient."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    g = torch.randn(m, n, device=device, dtype=dtype)
    return {'fwd': lambda: torch.nn.functional.linear(x, w), 'dgrad': lambda: g @ w, 'wgrad': lambda: g.t() @ x}


def row_padded(rows, cols, dtype, device, fill=True):
    """A ``(rows, cols)`` view of a ``(rows, padded(cols))`` buffer: its row stride a multiple of 8 elements."""
    buffer = (torch.randn if fill else torch.empty)(rows, padded(cols), device=device, dtype=dtype)
    return buffer[:, :cols]


def row_padded_products(m, k, n, dtype, device):
    """:func:`products` with every operand and result a :func:`row_padded` view (results written with ``out=``)."""
    x, w, g = (row_padded(r, c, dtype, device) for r, c in ((m, k), (n, k), (m, n)))
    y, dx, dw = (row_padded(r, c, dtype, device, fill=False) for r, c in ((m, n), (m, k), (n, k)))
    return {'fwd': lambda: torch.mm(x, w.t(), out=y), 'dgrad': lambda: torch.mm(g, w, out=dx),
            'wgrad': lambda: torch.mm(g.t(), x, out=dw)}


def host_us(fn, calls=50):
    """Microseconds of host time per call of ``fn``, issued ``calls`` times from an idle GPU without waiting."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return ' + '.join(name[:60] for name in names) or '-'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=sorted(ARCH_SETTINGS))
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224))
    parser.add_argument('--dtype', default='fp16', choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('gemm_alignment.py needs a CUDA GPU')
    from triton.testing import do_bench
    dtype = DTYPES[args.dtype]
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.arch}, batch {args.batch} at '
          f'{args.size[0]}x{args.size[1]}, {args.dtype}; {time.strftime("%Y-%m-%d %H:%M")}', flush=True)
    timed, cases = [], []
    for stage, name, m, k, n in block_matmuls(args.arch, args.batch, args.size):
        shapes = {'as is': (k, n, products)}
        if (padded(k), padded(n)) != (k, n):
            shapes['padded to 8'] = (padded(k), padded(n), products)
            shapes['rows padded'] = (k, n, row_padded_products)
        for label, (kk, nn, make) in shapes.items():
            for product, fn in make(m, kk, nn, dtype, 'cuda').items():
                ms = do_bench(fn, warmup=10, rep=50, return_mode='median')
                timed.append((stage, name, label, m, kk, nn, product, ms, host_us(fn)))
                cases.append(fn)
            torch.cuda.empty_cache()
    names = [kernel_names(fn) for fn in cases]  # after every timing (a trace can tax later launches)
    print('| stage | matmul | channels | M x K -> N | product | ms | host us | kernels |')
    print('| --- | --- | --- | --- | --- | ---: | ---: | --- |')
    for (stage, name, label, m, k, n, product, ms, host), kernels in zip(timed, names):
        print(f'| {stage} | {name} | {label} | {m} x {k} -> {n} | {product} | {ms:.4f} | {host:.1f} | {kernels} |')
    totals = {}
    for stage, name, label, m, k, n, product, ms, host in timed:
        ms_total, host_total = totals.get((stage, label), (0.0, 0.0))
        totals[stage, label] = (ms_total + ms, host_total + host)
    labels = ('as is', 'padded to 8', 'rows padded')
    print('\n| stage | ' + ' | '.join(f'all products, {label} (ms; host us)' for label in labels) + ' |')
    print('| --- |' + ' ---: |' * len(labels))
    for stage in sorted({key[0] for key in totals}):
        cells = [totals.get((stage, label)) for label in labels]
        print(f'| {stage} | ' + ' | '.join('-' if c is None else f'{c[0]:.3f}; {c[1]:.0f}' for c in cells) + ' |')


if __name__ == '__main__':
    main()

"""Check and time the fused depthwise conv + activation on a GPU against copy bandwidth and cuDNN.

    python benchmarks/dwconv_kernels.py [--sweep]

For GroupMamba-T's shapes at batch 128, 224x224 (the Mamba layer's SiLU conv on C channels and the FFN's
GELU conv on its hidden channels, each stage) and the detection shape: the forward and the backward
(launchers only: pre-activation pass, transposed conv, reduction; and the backward that also writes the
recomputed output, as the FFN's conv does), median ms of back-to-back calls
(``triton.testing.do_bench``) and of CUDA-graph replays (``do_bench_cudagraph``: the kernels without the
host's launch cost), the minimal bytes over the replayed time as a fraction of copy bandwidth, and the
PyTorch reference (cuDNN's depthwise conv, permutes, activation) forward + backward. Every shape is first
checked against the reference. ``--sweep`` also times a grid of launch settings (warps, register prefetch,
pipeline stages; replayed) for the FFN convs of stages 1-3 and the detection shape, each printed, then the
best (the defaults are chosen in triton_dwconv.choose_tiles).
"""
import argparse
import itertools

import torch
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench, do_bench_cudagraph

from mmgroupmamba.kernels import depthwise_conv_act_reference
from mmgroupmamba.kernels.dwconv import split_param_grads
from mmgroupmamba.kernels.triton_dwconv import choose_tiles, dwconv_act_backward, dwconv_act_forward
from scan_kernels import copy_bandwidth, log, rel_err

SHAPES = [  # name, batch, H, W, channels, activation
    ('s1 layer', 128, 56, 56, 64, 'silu'), ('s1 ffn', 128, 56, 56, 512, 'gelu'),
    ('s2 layer', 128, 28, 28, 128, 'silu'), ('s2 ffn', 128, 28, 28, 1024, 'gelu'),
    ('s3 layer', 128, 14, 14, 348, 'silu'), ('s3 ffn', 128, 14, 14, 1392, 'gelu'),
    ('s4 ffn', 128, 7, 7, 1792, 'gelu'), ('det ffn', 2, 200, 336, 512, 'gelu'),
]
SWEEP = dict(num_warps=(4, 8), prefetch=(False, True), stages=(1, 2, 3, 4))  # tile sizes: choose_tiles'
SWEEP_SHAPES = ('s1 ffn', 's2 ffn', 's3 ffn', 'det ffn')  # most of the conv time of a training step


def inputs(batch, height, width, channels, dtype=torch.float16):
    x = torch.randn(batch, height, width, channels, device='cuda', dtype=dtype)
    weight = torch.randn(channels, 1, 3, 3, device='cuda') * 0.3
    bias = torch.randn(channels, device='cuda') * 0.1
    return x, weight, bias, torch.randn_like(x)


def check(x, weight, bias, dout, activation):
    x, dout = x[:2], dout[:2]  # two images are enough for the comparison
    leaves = [t.float().detach().requires_grad_() for t in (x, weight, bias)]
    expected = depthwise_conv_act_reference(*leaves, activation)
    grads = torch.autograd.grad(expected, leaves, dout.float())
    out = dwconv_act_forward(x, weight, bias, activation)
    dx, dparams, _ = dwconv_act_backward(dout, x, weight, bias, activation)
    dweight, dbias = split_param_grads(dparams, weight, bias)
    return max(rel_err(a.float(), b) for a, b in zip((out, dx, dweight, dbias), (expected, *grads)))


def time_ms(x, weight, bias, dout, activation, replayed=False, need_output=False, **tiling):
    """Median ms of the forward and the backward launchers: called back to back (what eager code pays: a
    launcher whose host time exceeds its kernels' is timed by its host), or ``replayed`` from a CUDA graph
    (the kernels alone). ``need_output``: the backward also writes the recomputed output, as the FFN's conv
    does for the linear layer after it (with its ones column, ``ops_util.with_ones_column``)."""
    bench = do_bench_cudagraph if replayed else do_bench
    fwd = bench(lambda: dwconv_act_forward(x, weight, bias, activation, **tiling), return_mode='median')
    bwd = bench(lambda: dwconv_act_backward(dout, x, weight, bias, activation, need_output=need_output, **tiling),
                return_mode='median')
    return fwd, bwd


def reference_ms(x, weight, bias, dout, activation):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def step():
        with torch.autocast('cuda', dtype=x.dtype):
            out = depthwise_conv_act_reference(*leaves, activation)
        torch.autograd.grad(out, leaves, dout)

    return do_bench(step, return_mode='median')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sweep', action='store_true')
    args = parser.parse_args(argv)
    # The launchers are called directly, outside the ops: launch as the ops' eager path does, without
    # torch.library's tracing wrapper around each launch (it multiplies the host's cost per launch, which the
    # back-to-back timings would then measure).
    with set_wrap_triton_enabled(False):
        run(args.sweep)


def run(sweep):
    bandwidth = copy_bandwidth()
    log(f'{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; fp16 maps')
    log('| shape | B x H x W x C | max rel err | fwd ms called | fwd ms replayed | fwd %BW replayed | bwd ms called '
        '| bwd ms replayed | bwd %BW replayed | bwd + output ms replayed | bwd + output %BW replayed '
        '| reference fwd+bwd ms called | tiles (fwd) |')
    log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, batch, height, width, channels, activation in SHAPES:
        tensors = inputs(batch, height, width, channels)
        err = check(*tensors, activation)
        fwd, bwd = time_ms(*tensors, activation)
        fwd_kernels, bwd_kernels = time_ms(*tensors, activation, replayed=True)
        _, bwd_out_kernels = time_ms(*tensors, activation, replayed=True, need_output=True)
        size = tensors[0].numel() * tensors[0].element_size()
        # Minimal traffic: forward reads x, writes out; backward reads x and dout, writes dx (and the output).
        fwd_bw, bwd_bw = 2 * size / (fwd_kernels * 1e-3) / bandwidth, 3 * size / (bwd_kernels * 1e-3) / bandwidth
        bwd_out_bw = 4 * size / (bwd_out_kernels * 1e-3) / bandwidth
        ref = reference_ms(*tensors, activation)
        log(f'| {name} | {batch}x{height}x{width}x{channels} | {err:.1e} | {fwd:.3f} | {fwd_kernels:.3f} | '
            f'{fwd_bw:.0%} | {bwd:.3f} | {bwd_kernels:.3f} | {bwd_bw:.0%} | {bwd_out_kernels:.3f} | {bwd_out_bw:.0%} '
            f'| {ref:.3f} | {choose_tiles(tensors[0])} |')
        if sweep and name in SWEEP_SHAPES:
            timings = []
            for values in itertools.product(*SWEEP.values()):
                tiling = dict(zip(SWEEP, values))
                timings.append((time_ms(*tensors, activation, replayed=True, **tiling), tiling))
                (fwd_ms, bwd_ms), _ = timings[-1]
                log(f'    {tiling}: fwd {fwd_ms:.3f} ms ({2 * size / (fwd_ms * 1e-3) / bandwidth:.0%}), '
                    f'bwd {bwd_ms:.3f} ms ({3 * size / (bwd_ms * 1e-3) / bandwidth:.0%})')
            for label, index in (('fwd', 0), ('bwd', 1)):
                (best, tiling) = min(timings, key=lambda t: t[0][index])
                log(f'    best {label}: {best[index]:.3f} ms with {tiling}')
        del tensors
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()

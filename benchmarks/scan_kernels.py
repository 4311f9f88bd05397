"""Check and time the Triton selective scan on a GPU against the card's copy bandwidth and the reference.

    python benchmarks/scan_kernels.py [--dtypes fp32,bf16] [--skip-checks] [--sweep] [--sweep-dtypes fp32]
                                      [--carry-forms] [--chunk-sweep] [--stages N ...] [--skip-table]
                                      [--versus FILE] [--shapes NAME ...]

Steps: (1) copy bandwidth of the card (large device-to-device copy, bytes read + written); (2) correctness of
forward and all gradients against the float64 reference on small odd shapes and on each benchmark shape at
a small batch, with and without the sequence split; (3) determinism (two backward passes bitwise equal);
(4) for GroupMamba-T's stage shapes (batch 128) and the detection shape (batch 2, 200x336, 64 channels):
median time (triton.testing.do_bench), minimal bytes moved, fraction of copy bandwidth, forward and
backward, and the speedup over the PyTorch reference where the reference fits. ``--sweep`` also times a
grid of tilings per shape (used to pick the defaults in triton_scan.choose_config), and the default tiling
with its tile loop software-pipelined 1-4 stages deep. ``--carry-forms`` times each shape's main pass in its
two compiled forms, the carry entering each program composed from chunk summaries (``HAS_HIN``/``HAS_GIN``, the
form a split scan launches) or started at zero (the form an unsplit scan launches), with identical results
checked: without a split the composing loop runs no iteration, yet the backward kernel compiles to 255
registers with spills in one form and 109-168 without in the other (benchmarks/kernel_registers.py).
``--chunk-sweep`` times the default tiling with the sequence split into 1, 2, 4, 8 and 16 chunks (the
launchers split only where batch x groups x channel blocks cannot fill the GPU; a split adds a summary pass that
reads the inputs again, and more programs to hide each tile's latency).
"""
import argparse
import importlib.util
import math
import statistics
import sys
import time

import torch
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench, do_bench_cudagraph

from mmgroupmamba.kernels import selective_scan, selective_scan_reference, triton_scan


def selective_scan_triton(u, delta, A_logs, B, C, D, delta_bias, hw, **tiling):
    """The scan op with forced tilings (Triton: the benchmark's tensors are on the GPU)."""
    return selective_scan(u, delta, A_logs, B, C, D, delta_bias, hw, tiling=tiling)


SHAPES = [  # name, batch, (H, W), channels
    ('stage1', 128, (56, 56), 64),
    ('stage2', 128, (28, 28), 128),
    ('stage3', 128, (14, 14), 348),
    ('stage4', 128, (7, 7), 448),
    ('det', 2, (200, 336), 64),
]
# The other stages of the detection step (bs 2 at 800x1344), with the channels the model stores (stage 3 padded to
# 352): their scans are split into many short chunks, where the stage shapes above run unsplit.
DETECTION_SHAPES = [
    ('det s2', 2, (100, 168), 128),
    ('det s3', 2, (50, 84), 352),
    ('det s4', 2, (25, 42), 448),
]
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
NAMES = ['u', 'delta', 'A_logs', 'B', 'C', 'D', 'delta_bias']
DEVICE = 'cuda'


def log(*args):
    print(*args, flush=True)


def make_inputs(batch, hw, channels, dtype, device, seed, requires_grad=False):
    gen = torch.Generator(device=device).manual_seed(seed)
    length = hw[0] * hw[1]

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*shape, generator=gen, device=device) * scale + shift
        return t.to(dt).requires_grad_(requires_grad)

    # Parameters stay fp32 as under autocast; activations take the benchmark dtype.
    # Decay rates A = -exp(A_logs) in (-2.05, -0.05].
    A_logs = (torch.rand(channels, generator=gen, device=device) * 2 + 0.05).log().requires_grad_(requires_grad)
    return dict(u=rand(batch, length, channels), delta=rand(batch, length, channels, scale=1.5, shift=-1.0),
                A_logs=A_logs, B=rand(batch, length, 4), C=rand(batch, length, 4),
                D=rand(channels, dt=torch.float32), delta_bias=rand(channels, scale=0.5, dt=torch.float32),
                hw=hw)


def rel_err(a, b):
    """Relative error; absolute where the exact value is 0 (e.g. dA at L=1, where no state decays)."""
    ref_norm = b.double().norm()
    return ((a.double() - b.double()).norm() / (ref_norm if ref_norm > 0 else 1.0)).item()


def check(batch, hw, channels, dtype, seed, **tiling):
    """Largest relative error of the output and the 7 gradients against the float64 reference."""
    inp = make_inputs(batch, hw, channels, dtype, DEVICE, seed, requires_grad=True)
    y = selective_scan_triton(**inp, **tiling)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inp[n] for n in NAMES], dy)
    ref_in = {k: (v.detach().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in inp.items()}
    y_ref = selective_scan_reference(**ref_in)
    grads_ref = torch.autograd.grad(y_ref, [ref_in[n] for n in NAMES], dy.double())
    errs = {'y': rel_err(y, y_ref)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(NAMES, grads, grads_ref)})
    assert y.dtype == dtype and all(g.dtype == inp[n].dtype for n, g in zip(NAMES, grads))
    return errs


def correctness(dtypes):
    log('== correctness against the float64 reference (max relative error over y and 7 gradients)')
    ok = True
    cases = [(2, (1, 1), 8, {}), (3, (5, 7), 12, {}), (2, (13, 11), 36, dict(chunk_len=32)),
             (2, (9, 17), 348, dict(chunk_len=(64, 16)))]
    cases += [(2, hw, ch, {}) for _, _, hw, ch in SHAPES[:4]]
    cases += [(1, (200, 336), 64, {}), (2, (56, 56), 64, dict(chunk_len=256))]
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for i, (batch, hw, ch, tiling) in enumerate(cases):
            errs = check(batch, hw, ch, dtype, seed=i, **tiling)
            worst = max(errs, key=errs.get)
            good = errs[worst] <= tol and all(math.isfinite(e) for e in errs.values())
            ok &= good
            log(f'  {dtype_name} batch={batch} hw={hw} ch={ch} {tiling}: max {errs[worst]:.2e} ({worst}) '
                f'{"ok" if good else "FAIL"}')
    return ok


def determinism():
    log('== determinism (two backward passes, bitwise)')
    ok = True
    for name, batch, hw, ch in (SHAPES[0], SHAPES[2], SHAPES[-1]):
        inp = make_inputs(batch, hw, ch, torch.float32, DEVICE, 7, requires_grad=True)
        y = selective_scan_triton(**inp)
        dy = torch.randn_like(y)
        g1 = torch.autograd.grad(y, [inp[n] for n in NAMES], dy, retain_graph=True)
        g2 = torch.autograd.grad(selective_scan_triton(**inp), [inp[n] for n in NAMES], dy)
        same = all(torch.equal(a, b) for a, b in zip(g1, g2))
        ok &= same
        log(f'  {name}: {"bitwise equal" if same else "DIFFERENT"}')
    return ok


def copy_bandwidth():
    x = torch.empty(2 ** 29, dtype=torch.float32, device=DEVICE).normal_()  # 2 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode='median')
    return 2 * 2 ** 31 / (ms * 1e-3)


def minimal_bytes(batch, length, channels, dtype):
    e = torch.tensor([], dtype=dtype).element_size()
    big = batch * length * channels * e  # one (batch, L, channels) tensor
    bc = batch * length * 4 * e  # one of B, C
    fwd = 3 * big + 2 * bc  # read u, delta, B, C; write y
    bwd = 5 * big + 4 * bc  # read u, delta, B, C, dy; write du, ddelta, dB, dC
    return fwd, bwd


def time_pair(fn_fwd, inp, dy, rep=100):
    """Median ms of the forward (as in training: checkpoints saved) and of the backward alone."""
    fwd = do_bench(lambda: fn_fwd(**inp), warmup=25, rep=rep, return_mode='median')
    y = fn_fwd(**inp)
    leaves = [inp[n] for n in NAMES]
    bwd = do_bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), warmup=25, rep=rep,
                   return_mode='median')
    return fwd, bwd


def bench_shapes(dtypes, bandwidth, shapes):
    log('== timings (median ms; %BW = minimal bytes / time / copy bandwidth)')
    rows = []
    header = (f'{"shape":7} {"dtype":5} {"batch":>5} {"HxW":>8} {"ch":>4} | {"fwd ms":>7} {"fwd %BW":>7} '
              f'{"ref ms":>8} {"x":>6} | {"bwd ms":>7} {"bwd %BW":>7} {"ref ms":>8} {"x":>6} | config')
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for name, batch, hw, ch in shapes:
            length = hw[0] * hw[1]
            inp = make_inputs(batch, hw, ch, dtype, DEVICE, 1, requires_grad=True)
            dy = torch.randn(batch, length, ch, device=DEVICE, dtype=dtype)
            fwd, bwd = time_pair(selective_scan_triton, inp, dy)
            fb, bb = minimal_bytes(batch, length, ch, dtype)
            try:
                ref_f, ref_b = time_pair(selective_scan_reference, inp, dy, rep=50)
            except torch.cuda.OutOfMemoryError:
                ref_f = ref_b = float('nan')
            torch.cuda.empty_cache()
            cfg = triton_scan.choose_config(inp['u'])
            row = (f'{name:7} {dtype_name:5} {batch:5d} {hw[0]:>3}x{hw[1]:<4} {ch:4d} | {fwd:7.3f} '
                   f'{fb / (fwd * 1e-3) / bandwidth:7.1%} {ref_f:8.3f} {ref_f / fwd:6.1f} | {bwd:7.3f} '
                   f'{bb / (bwd * 1e-3) / bandwidth:7.1%} {ref_b:8.3f} {ref_b / bwd:6.1f} | {cfg}')
            rows.append(row)
            log(row)
    log(header)
    for row in rows:
        log(row)


def launcher_cases(dtypes, seed, shapes):
    """For each dtype and shape: ``(name, dtype_name, hw, inp, args, dy)``, ``args`` the launchers' inputs."""
    for dtype_name in dtypes:
        for name, batch, hw, ch in shapes:
            torch.cuda.empty_cache()
            inp = make_inputs(batch, hw, ch, DTYPES[dtype_name], DEVICE, seed)
            yield name, dtype_name, hw, inp, [inp[n] for n in NAMES] + [hw], torch.randn_like(inp['u'])


def time_launchers(args, dy, cfg, rep=40, module=triton_scan):
    """Median ms of the forward launcher (states kept, as in training) and of the backward launcher, each replayed
    from a CUDA graph: the kernels alone. Timed as called, the small shapes' launchers measure the host's Python
    (about 0.1 ms forward and 0.2 backward at the detection step's stage 4, whatever the split: thirty-first
    session), not the kernels the compiled and graphed steps run. ``module``: the launchers' module (another
    version's, for ``--versus``)."""
    f = do_bench_cudagraph(lambda: module.scan_forward(*args, cfg, save_states=True), rep=rep,
                           return_mode='median')
    _, states = module.scan_forward(*args, cfg, save_states=True)
    b = do_bench_cudagraph(lambda: module.scan_backward(dy, *args, states, cfg), rep=rep,
                           return_mode='median')
    return f, b


def load_version(path):
    """Another version of ``triton_scan.py`` (e.g. ``git show REV:kernels/triton_scan.py > FILE``) as a module of
    the installed package, so that its relative imports resolve as the installed file's do."""
    spec = importlib.util.spec_from_file_location(f'{triton_scan.__package__}._versus_triton_scan', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versus(dtypes, shapes, other, rounds=3):
    """The installed kernels against ``other``'s, default tilings, in alternating rounds: the results compared
    (forward output and every gradient, largest relative difference) and the median ms of each, kernels alone."""
    log(f'== versus {other.__file__}: default tilings, {rounds} alternating rounds, median ms of the kernels')
    for name, dtype_name, _, inp, args, dy in launcher_cases(dtypes, 5, shapes):
        versions = {'installed': triton_scan, 'other': other}
        results = {}
        for label, module in versions.items():
            cfg = module.choose_config(inp['u'])
            y, states = module.scan_forward(*args, cfg, save_states=True)
            results[label] = (y, *module.scan_backward(dy, *args, states, cfg))
        diff = max(rel_err(a, b) for a, b in zip(results['other'], results['installed']))
        times = {label: [] for label in versions}
        for _ in range(rounds):
            for label, module in versions.items():
                times[label].append(time_launchers(args, dy, module.choose_config(inp['u']), module=module))
        (fi, bi), (fo, bo) = ([statistics.median(t[k] for t in times[label]) for k in (0, 1)] for label in versions)
        log(f'  {name:7} {dtype_name:5} fwd {fi:.4f} installed / {fo:.4f} other ({fo / fi:.3f}x) | bwd {bi:.4f} / '
            f'{bo:.4f} ({bo / bi:.3f}x) | largest difference {diff:.1e}')


def time_stages(name, dtype_name, inp, args, dy, depths=(1, 2, 3, 4)):
    """The default tiling with the tile loop software-pipelined (Triton's num_stages) ``depths`` deep."""
    for stages in depths:
        cfg = triton_scan.choose_config(inp['u'], stages=stages)
        f, b = time_launchers(args, dy, cfg)
        log(f'  {name} {dtype_name} default tiling, stages={stages}: fwd {f:.4f} bwd {b:.4f} | {cfg}')


def stages_only(dtypes, shapes, depths):
    log(f'== default tilings, pipelined {depths} stages deep: median ms of the kernels (replayed)')
    for name, dtype_name, _, inp, args, dy in launcher_cases(dtypes, 2, shapes):
        time_stages(name, dtype_name, inp, args, dy, depths)


def sweep(dtypes, shapes):
    """Time the forward and backward kernels alone over a grid of tilings (launchers, no autograd)."""
    log('== sweep: median ms of the kernels for each tiling')
    for name, dtype_name, hw, inp, args, dy in launcher_cases(dtypes, 2, shapes):
        batch, _, ch = inp['u'].shape
        per_group = ch // 4
        block_cs = sorted({min(16, triton_next(per_group)), min(32, triton_next(per_group))})
        # At a detection batch the launchers' own split (chunks from the tile and the program count) is swept;
        # --chunk-sweep times other splits of the default tiles.
        chunks = [None]
        best = {}
        time_stages(name, dtype_name, inp, args, dy)
        for bc in block_cs:
            for bt in (16, 32, 64, 128, 256):  # 16: fewer levels of each cross-thread scan
                for per_thread in (8, 16):  # elements of a tile per thread
                    nw = bt * bc // (32 * per_thread)
                    if nw not in (1, 2, 4, 8) or bt > 2 * triton_next(hw[0] * hw[1]):
                        continue
                    for chunk in chunks:
                        cfg = triton_scan.choose_config(inp['u'], chunk_len=chunk, block_t=bt, block_c=bc,
                                                        num_warps=nw)
                        try:
                            f, b = time_launchers(args, dy, cfg)
                        except Exception as exc:  # a tiling that does not compile is skipped, not fatal
                            log(f'  {name} {dtype_name} bt={bt} bc={bc} nw={nw} chunk={chunk}: {exc!r:.200}')
                            continue
                        key = (bt, bc, nw, chunk)
                        best.setdefault('fwd', []).append((f, key))
                        best.setdefault('bwd', []).append((b, key))
                        log(f'  {name} {dtype_name} bt={bt:3d} bc={bc:2d} nw={nw} chunk={chunk}: '
                            f'fwd {f:.4f} bwd {b:.4f}')
        for k in best:
            top = sorted(best[k])[:3]
            log(f'  BEST {name} {dtype_name} {k}: ' + ', '.join(f'{t:.4f} {key}' for t, key in top))


class _CarryFormForced:
    """A scan kernel whose main-pass launches (``SUMMARY=False``) get ``flag=value``: the launchers' own argument
    lists, with the one constexpr that selects how the entering carry is formed set by the benchmark."""

    def __init__(self, kernel, flag, value):
        self.kernel, self.flag, self.value = kernel, flag, value

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def forced(*args, **meta):
            if not meta['SUMMARY']:
                meta[self.flag] = self.value
            return launch(*args, **meta)

        return forced


def _with_carry_form(composed, fn):
    """``fn()`` with the scan's main passes forced into the composed-carry form (``composed``) or the zero-start
    form: the launchers' ``launchable`` (the kernel itself in eager launches) swapped for one that sets the flag."""
    flags = {triton_scan._scan_fwd_kernel: 'HAS_HIN', triton_scan._scan_bwd_kernel: 'HAS_GIN'}
    saved = triton_scan.launchable
    triton_scan.launchable = lambda kernel: _CarryFormForced(kernel, flags[kernel], composed)
    try:
        return fn()
    finally:
        triton_scan.launchable = saved


def carry_forms(dtypes, shapes):
    """Median ms of the forward and backward launchers at the default tiling, main pass in each carry form."""
    log('== carry forms: main pass with the carry composed from summaries (HAS_HIN/HAS_GIN=True) or started '
        'at zero (False); median ms, results compared bitwise')
    ok = True
    for name, dtype_name, hw, inp, args, dy in launcher_cases(dtypes, 3, shapes):
        cfg = triton_scan.choose_config(inp['u'])
        length = hw[0] * hw[1]
        if max(cfg.fwd.n_chunks(length), cfg.bwd.n_chunks(length)) > 1:
            log(f'  {name:7} {dtype_name:5} split into chunks by default: only the composed form is exact')
            continue
        times, results = {}, {}
        for composed in (False, True):
            def run():
                y, states = triton_scan.scan_forward(*args, cfg, save_states=True)
                return time_launchers(args, dy, cfg, rep=60), (y, *triton_scan.scan_backward(dy, *args, states, cfg))
            times[composed], results[composed] = _with_carry_form(composed, run)
        same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
        ok &= same
        (f0, b0), (f1, b1) = times[False], times[True]
        log(f'  {name:7} {dtype_name:5} fwd zero {f0:.4f} composed {f1:.4f} ({f1 / f0:.2f}x) | '
            f'bwd zero {b0:.4f} composed {b1:.4f} ({b1 / b0:.2f}x) | '
            f'{"bitwise equal" if same else "DIFFERENT"} | {cfg}')
    return ok


def chunk_sweep(dtypes, shapes):
    """Median ms of the forward and backward launchers at the default tiles, the sequence in 1-16 chunks and in
    chunks of 1, 2, 4 and 8 of the forward's tiles (the detection shapes split into hundreds)."""
    log('== chunk sweep: median ms of the launchers, default tiles, sequence split into n chunks')
    for name, dtype_name, hw, inp, args, dy in launcher_cases(dtypes, 4, shapes):
        length = hw[0] * hw[1]
        default = triton_scan.choose_config(inp['u'])
        by_tiles = {math.ceil(length / (tiles * default.fwd.block_t)) for tiles in (1, 2, 4, 8)}
        cells = []
        for n in (None, *sorted({1, 2, 4, 8, 16} | by_tiles)):
            cfg = default if n is None else triton_scan.choose_config(inp['u'], chunk_len=math.ceil(length / n))
            if n is not None and cfg.fwd.n_chunks(length) != n:
                continue  # fewer chunks than asked: a chunk is at least a tile
            f, b = time_launchers(args, dy, cfg, rep=60)
            label = f'default ({default.fwd.n_chunks(length)}/{default.bwd.n_chunks(length)})' if n is None else n
            cells.append(f'{label}: {f:.4f} + {b:.4f}')
        log(f'  {name:7} {dtype_name:5} fwd + bwd ms by chunks | ' + ' | '.join(cells))


def triton_next(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dtypes', default='fp32,bf16')
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--sweep-dtypes', default='fp32')
    parser.add_argument('--skip-checks', action='store_true')
    parser.add_argument('--carry-forms', action='store_true')
    parser.add_argument('--chunk-sweep', action='store_true')
    parser.add_argument('--stages', type=int, nargs='+', metavar='N', help='time the default tilings with the '
                        'tile loop pipelined N stages deep (--sweep starts with 1 2 3 4)')
    parser.add_argument('--versus', metavar='FILE', help='time the installed kernels against another version of '
                        'triton_scan.py (default tilings, kernels alone, alternating rounds)')
    names = [shape[0] for shape in SHAPES + DETECTION_SHAPES]
    parser.add_argument('--shapes', nargs='+', choices=names, default=[shape[0] for shape in SHAPES],
                        metavar='NAME', help=f'the shapes of steps (4) and after, of {names}; default the first '
                        f'{len(SHAPES)}')
    parser.add_argument('--skip-table', action='store_true', help='leave out step (4), the timings against the '
                        'reference')
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(',')
    shapes = [shape for shape in SHAPES + DETECTION_SHAPES if shape[0] in args.shapes]
    if not torch.cuda.is_available():
        sys.exit('scan_kernels.py needs a CUDA GPU')
    props = torch.cuda.get_device_properties(0)
    log(f'device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; '
        f'triton {__import__("triton").__version__}; {time.strftime("%Y-%m-%d %H:%M")}')
    bandwidth = copy_bandwidth()
    log(f'copy bandwidth: {bandwidth / 1e12:.3f} TB/s (read + write)')
    ok = True
    if not args.skip_checks:
        ok &= correctness(dtypes)
        ok &= determinism()
    if not args.skip_table:
        bench_shapes(dtypes, bandwidth, shapes)
    if args.carry_forms:
        with set_wrap_triton_enabled(False):  # the launchers called directly, as the op's eager path calls them
            ok &= carry_forms(dtypes, shapes)
    if args.chunk_sweep:
        with set_wrap_triton_enabled(False):
            chunk_sweep(dtypes, shapes)
    if args.versus:
        with set_wrap_triton_enabled(False):
            versus(dtypes, shapes, load_version(args.versus))
    if args.stages:
        with set_wrap_triton_enabled(False):
            stages_only(dtypes, shapes, args.stages)
    if args.sweep:
        # The sweep calls the launchers directly, outside the op: launch as the op's eager path does, without
        # torch.library's tracing wrapper around each launch (it multiplies the host's cost per launch).
        with set_wrap_triton_enabled(False):
            sweep(args.sweep_dtypes.split(','), shapes)
    log('checks passed' if ok else 'CHECKS FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())

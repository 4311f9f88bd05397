"""GPU speed and memory of GroupMamba T/S/B against the Swin Transformer of each size, measured in one run on one
card.

    python benchmarks/backbone_speed.py [--models T S B] [--batch 128] [--steps 20] [--cuda-graph] [--compile]
                                        [--no-eager] [--compile-options JSON] [--skip-detection]
                                        [--skip-classification] [--adamw {fused,foreach}]

For every model:

* training throughput: bs 128, 224x224, AMP fp16 with a GradScaler, AdamW step (``--adamw``: PyTorch's fused
  implementation by default, which reads the GradScaler's inf flag on the GPU, or its per-list ``foreach``
  one, whose step waits for that flag on the host);
* inference throughput: bs 128, AMP fp16;
* peak training memory in the steady state, as reserved by the caching allocator (it includes the pool that
  graph replays use; allocated memory, which misses it, is printed beside, and so is the graph pools' part);
* the detection-size backbone step: bs 2, 800x1344, forward + backward under AMP.

Swin-T and Swin-S are mmdet's own, built from its Mask R-CNN configs, Swin-B from Swin's published settings
(``SWIN_CONFIGS``); the classifiers are each backbone + global average pooling + a 1000-way linear head, the same
for all. The last lines print a table with each GroupMamba's ratios to the Swin of its size.

``--cuda-graph`` adds a row per model whose backbone forward and backward are replayed from CUDA graphs
(GroupMamba's ``cuda_graph=True``; Swin wrapped in the same :class:`CudaGraphs`); ``--compile`` a row per
model whose backbone runs through ``torch.compile`` (GroupMamba's ``compile=True``: dynamic sizes, one graph,
its Inductor defaults; Swin through the same :class:`CompiledForward`, without ``fullgraph``, with Inductor's
own defaults, as users compile it). ``--compile-options`` go to both, over those defaults. Ratios are to the Swin
of the same size in the same mode. The launches column counts kernel launches in one detection step
(torch.profiler), after all rows are timed.
"""
import argparse
import contextlib
import gc
import json
import os
import time

import torch
import torch.nn.functional as F
from mmengine.hub import get_config

import mmgroupmamba  # noqa: F401  (registers GroupMamba)
from mmgroupmamba.models.compiled import STATIC_USER_KERNELS, CompiledForward, static_user_kernels_in_compile_workers
from mmgroupmamba.models.cuda_graph import CudaGraphs
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS

NAMES = {'T': 'tiny', 'S': 'small', 'B': 'base'}
# Each GroupMamba size is compared with the Swin Transformer of its size, built as mmdet builds it: T and S from
# mmdet's Mask R-CNN configs; B, for which mmdet has no config, from Swin's published B settings (Liu et al.,
# 2021: C = 128, depths 2-2-18-2, heads 4-8-16-32) on S's config, which has B's depths.
SWIN_CONFIGS = {'T': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
                'S': 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'}
SWIN_B = dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])


class Classifier(torch.nn.Module):
    """Backbone, global average pooling of its last map, and a 1000-way linear head."""

    def __init__(self, backbone, channels):
        super().__init__()
        self.backbone = backbone
        self.fc = torch.nn.Linear(channels, 1000)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


class GraphedBackbone(torch.nn.Module):
    """Any backbone whose forward (and backward) are replayed from CUDA graphs, as GroupMamba's are with
    ``cuda_graph=True``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.graphs = CudaGraphs(type(backbone).__name__)

    def _apply(self, fn, *args, **kwargs):
        self.graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        return self.graphs(self.backbone, self.backbone.forward, x)


class CompiledBackbone(torch.nn.Module):
    """Any backbone run through ``torch.compile`` as GroupMamba is with ``compile=True``."""

    def __init__(self, backbone, **options):
        super().__init__()
        self.backbone = backbone
        self.compiled = CompiledForward(type(backbone).__name__, options)

    def forward(self, x):
        return self.compiled(self.backbone.forward, x)


MODES = ('', ' +graphs', ' +compile')


def allocator_setting():
    """The caching allocator's setting the process runs under (``PYTORCH_CUDA_ALLOC_CONF``, read by PyTorch when
    CUDA starts), for the tables' headers: reserved memory depends on it (README, thirty-sixth session: expandable
    segments took GroupMamba-B's compiled step from 22.8 to 19.9 GiB reserved)."""
    return f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF') or '(unset)'}"


def backbone_step(backbone, images):
    """One training step of a backbone alone: forward under AMP fp16, a loss over all its outputs, backward.
    Gradients are set to None first, as an optimizer's ``zero_grad`` leaves them in training: backward then
    assigns each parameter's gradient instead of adding it to the last step's (one launch per parameter,
    565 of them in GroupMamba-T, which no training step pays)."""

    def step():
        backbone.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.float16):
            loss = sum(o.float().mean() for o in backbone(images))
        loss.backward()

    return step


def inference_step(model, images):
    """One inference step of a model in eval mode: its forward under AMP fp16, without gradients (the
    classification table's inference column, and ``profile_step.py --inference``)."""

    @torch.no_grad()
    def step():
        with torch.autocast(images.device.type, dtype=torch.float16):
            model(images)

    return step


def swin_config(size, drop_path_rate):
    """``(config, last stage's channels)`` of mmdet's SwinTransformer of ``size`` (T, S or B), untrained."""
    cfg = get_config(SWIN_CONFIGS['S' if size == 'B' else size]).model.backbone
    cfg.pop('init_cfg', None)
    cfg.drop_path_rate = drop_path_rate
    if size == 'B':
        cfg.update(SWIN_B)
    return cfg, cfg.embed_dims * 8


def baseline(name):
    """The row a row's ratios are to: the Swin Transformer of its size in its mode ('GroupMamba-S +graphs' ->
    'Swin-S +graphs')."""
    model, _, mode = name.partition(' ')
    return f'Swin-{model.rsplit("-", 1)[1]}' + (f' {mode}' if mode else '')


def missing_baselines(names, against=None):
    """The rows that ``names``' ratios are to (``against``, or each row's :func:`baseline`) but that are not
    among them, sorted."""
    bases = {against} if against else {baseline(name) for name in names}
    return sorted(bases - set(names))


def build_backbones(models, modes, drop_path_rate, compile_options=None, groupmamba_options=None):
    """For each size in ``models``, mmdet's SwinTransformer of that size (:func:`swin_config`) and GroupMamba
    (with ``groupmamba_options``, constructor arguments), with their last stage's channels, in each of ``modes``
    (name suffixes: '' eager, ' +graphs' replayed from CUDA graphs, ' +compile'; the compiled ones with
    ``compile_options``, torch.compile arguments over the backbones' defaults)."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope
    cfgs = {}
    for size in models:
        arch = NAMES[size]
        cfgs[f'Swin-{size}'] = swin_config(size, drop_path_rate)
        cfgs[f'GroupMamba-{size}'] = (dict(type='GroupMamba', arch=arch, drop_path_rate=drop_path_rate,
                                           **(groupmamba_options or {})), ARCH_SETTINGS[arch]['embed_dims'][-1])
    backbones = {}
    with DefaultScope.overwrite_default_scope('mmdet'):
        for mode in modes:
            for name, (cfg, channels) in cfgs.items():
                swin = name.startswith('Swin-')
                if mode == '':
                    model = DET_MODELS.build(cfg)
                elif mode == ' +graphs':
                    model = (GraphedBackbone(DET_MODELS.build(cfg)) if swin
                             else DET_MODELS.build(dict(cfg, cuda_graph=True)))
                else:
                    options = dict(compile_options or {})
                    model = (CompiledBackbone(DET_MODELS.build(cfg), **{'fullgraph': False, **options}) if swin
                             else DET_MODELS.build(dict(cfg, compile=options or True)))
                    if not swin and model._compiled.options.get('options', {}).get(STATIC_USER_KERNELS):
                        # Now, before any row compiles: Swin's rows come first and would start Inductor's compile
                        # workers without it (models/compiled.py).
                        static_user_kernels_in_compile_workers(name)
                backbones[name + mode] = (model, channels)
    return backbones


def timed(fn, steps, warmup=5):
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` untimed ones.

    A full collection of Python's cyclic garbage collector walks every object the process holds: on this
    project's CPU, 1.2 s after compiling GroupMamba-T once (a million objects, 285 thousand of them garbage
    the compile left). So one collection comes between the warm-up and the timed calls, timed and printed
    when it takes long, and the timed calls print any full collection of their own."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    freed = gc.collect()
    collect_s = time.perf_counter() - start
    if collect_s > 0.05:
        print(f'  (a full garbage collection before timing: {collect_s * 1000:.0f} ms, {freed} objects freed, '
              f'{len(gc.get_objects())} tracked)', flush=True)
    with garbage_collections() as collected:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    if collected['runs'][2]:
        print(f'  (in the {steps} timed calls: {collected["runs"][2]} full garbage collections, '
              f'{collected["seconds"] * 1000:.0f} ms in all collections)', flush=True)
    return seconds


@contextlib.contextmanager
def garbage_collections():
    """``{'runs': [per generation], 'seconds': s}``: the cyclic garbage collector's runs inside the block, and
    the time they took."""
    collected = {'runs': [0, 0, 0], 'seconds': 0.0}
    started = []

    def callback(phase, info):
        if phase == 'start':
            started.append(time.perf_counter())
        else:
            collected['seconds'] += time.perf_counter() - started.pop()
            collected['runs'][info['generation']] += 1

    gc.callbacks.append(callback)
    try:
        yield collected
    finally:
        gc.callbacks.remove(callback)


def classification_numbers(model, batch, steps, adamw):
    model = model.cuda().train()
    images = torch.randn(batch, 3, 224, 224, device='cuda')
    labels = torch.randint(0, 1000, (batch,), device='cuda')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, **{adamw: True})
    scaler = torch.amp.GradScaler('cuda')

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    # Memory is the steady state's: warm-up steps first (they record the graphs of graphed models), then the
    # cache of their transient blocks is dropped and the peaks are reset. Replays write into the graphs' own
    # pool without allocating, so allocated memory misses it; reserved memory counts it, and the memory
    # ratio is taken on reserved memory for every model.
    for _ in range(5):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_s = timed(train_step, steps, warmup=0)
    allocated = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    # Segments of private pools (those of recorded graphs): how much of the reserved memory they hold.
    graph_pool = sum(seg['total_size'] for seg in torch.cuda.memory_snapshot()
                     if tuple(seg['segment_pool_id']) != (0, 0)) / 2**30
    optimizer.state.clear()  # its AdamW moments are freed before the inference timing
    model.eval()

    infer_s = timed(inference_step(model, images), steps)
    model.cpu()
    return dict(train=batch / train_s, infer=batch / infer_s, allocated=allocated, reserved=reserved,
                graph_pool=graph_pool)


def kernel_launches(step):
    """Kernel launches the host issues in one call of ``step`` (CUDA runtime and driver launch calls)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if 'LaunchKernel' in e.name or e.name == 'cudaGraphLaunch')


def detection_step(backbone, steps):
    """Milliseconds of the backbone's detection-size step: bs 2, 800x1344, forward + backward under AMP."""
    with on_gpu(backbone) as step:
        return timed(step, steps) * 1000


def detection_launches(backbone):
    """Kernel launches of one detection-size step (profiled: call it after every timing, see
    :func:`detection_rows`)."""
    with on_gpu(backbone) as step:
        step()
        return kernel_launches(step)


@contextlib.contextmanager
def on_gpu(backbone):
    """The detection-size step of ``backbone``, moved to the GPU for the block and back to the CPU after it."""
    backbone.cuda()
    backbone.train()  # not chained: mmdet's SwinTransformer.train() returns None
    try:
        yield backbone_step(backbone, torch.randn(2, 3, 800, 1344, device='cuda'))
    finally:
        backbone.cpu()
        torch.cuda.empty_cache()


def detection_rows(backbones, steps, report=print):
    """``{name: (ms, launches)}`` of each backbone's detection step. Every row is timed before any row's
    launches are counted: once torch.profiler has traced CUDA in a process, CUPTI can stay attached to it
    (pytorch/pytorch#144455) and tax each later launch, and host-bound rows timed after a count were 1.4-2x
    slower than in a process of their own (twelfth and thirteenth sessions)."""
    rows = {}
    for name, (backbone, _) in backbones.items():
        rows[name] = [detection_step(backbone, steps)]
        report(name, 'detection step ms', rows[name][0], flush=True)
    for name, (backbone, _) in backbones.items():
        rows[name].append(detection_launches(backbone))
        report(name, 'launches per detection step', rows[name][1], flush=True)
    return {name: tuple(row) for name, row in rows.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['T', 'S', 'B'], choices=sorted(NAMES))
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--skip-detection', action='store_true')
    parser.add_argument('--skip-classification', action='store_true',
                        help='detection step only (a compiled row compiles once instead of three times)')
    parser.add_argument('--cuda-graph', action='store_true', help='add rows replayed from CUDA graphs')
    parser.add_argument('--compile', action='store_true', help='add rows run through torch.compile')
    parser.add_argument('--no-eager', action='store_true', help='leave out the eager rows')
    parser.add_argument('--compile-options', type=json.loads, default={},
                        help='torch.compile arguments for the compiled rows of both models, as JSON, e.g. '
                        '\'{"dynamic": false}\' or \'{"options": {"cpp_wrapper": true}}\'')
    parser.add_argument('--groupmamba-options', type=json.loads, default={},
                        help='GroupMamba constructor arguments, as JSON, e.g. \'{"channel_multiple": 1}\' (stage 3 '
                        'of T and S unpadded)')
    parser.add_argument('--adamw', choices=('fused', 'foreach'), default='fused')
    parser.add_argument('--rows', nargs='+', metavar='ROW',
                        help="only these rows, e.g. 'Swin-T +compile' 'Swin-T +graphs' 'GroupMamba-T +graphs' (a "
                        "GroupMamba row needs the Swin row of its mode: its ratios' baseline, unless --against)")
    parser.add_argument('--against', metavar='ROW',
                        help="every row's ratios to this row instead of the Swin of its size and mode, e.g. "
                        "'Swin-T +compile' (the yardstick: GroupMamba's best mode against compiled Swin)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    modes = [m for m, on in zip(MODES, (not args.no_eager, args.cuda_graph, args.compile)) if on]

    def build(drop_path_rate):
        rows = build_backbones(args.models, modes, drop_path_rate, args.compile_options, args.groupmamba_options)
        unknown = set(args.rows or ()) - set(rows)
        if unknown:
            parser.error(f'--rows: no row {sorted(unknown)} among {sorted(rows)} (see --models and the modes)')
        chosen = {name: row for name, row in rows.items() if args.rows is None or name in args.rows}
        # Checked before any timing: a missing baseline would otherwise fail only when the table is printed.
        missing = missing_baselines(chosen, args.against)
        if missing:
            parser.error(f'no row {missing} to take ratios to among {sorted(chosen)} (add it to --rows, or give '
                         '--against)')
        return chosen

    results = {}
    classifiers = {} if args.skip_classification else build(0.1)
    for name, (backbone, channels) in classifiers.items():
        start = time.perf_counter()
        results[name] = classification_numbers(Classifier(backbone, channels), args.batch, args.steps,
                                               args.adamw)
        torch.cuda.empty_cache()
        print(name, results[name], f'({time.perf_counter() - start:.0f} s with warm-up)', flush=True)
    if not args.skip_detection:
        for name, (ms, launches) in detection_rows(build(0.2), max(5, args.steps // 2)).items():
            results.setdefault(name, {}).update(det_ms=ms, launches=launches)

    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, AMP fp16, '
          f'AdamW {args.adamw}, steps {args.steps}, GroupMamba options {args.groupmamba_options}, '
          f'{allocator_setting()}; ratios to '
          + (args.against if args.against else 'the Swin of the same size in the same mode'))
    print('| model | train img/s | x Swin | infer img/s | x Swin | train peak reserved GiB | x Swin '
          '| (allocated GiB) | (in graph pools GiB) | det step ms (bs2 800x1344) | x Swin | launches per det step '
          '| x Swin |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, r in results.items():
        base = results[args.against or baseline(name)]
        det = (f'{r["det_ms"]:.1f} | {r["det_ms"] / base["det_ms"]:.2f} | {r["launches"]} | '
               f'{r["launches"] / max(base["launches"], 1):.2f}' if 'det_ms' in r else '- | - | - | -')
        cls = (f'{r["train"]:.0f} | {r["train"] / base["train"]:.2f} | {r["infer"]:.0f} | '
               f'{r["infer"] / base["infer"]:.2f} | {r["reserved"]:.1f} | {r["reserved"] / base["reserved"]:.2f} | '
               f'{r["allocated"]:.1f} | {r["graph_pool"]:.1f}' if 'train' in r else ' | '.join('-' * 8))
        print(f'| {name} | {cls} | {det} |')


if __name__ == '__main__':
    main()

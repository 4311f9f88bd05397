"""The kernels torch.compile launches for a backbone's detection step, listed on a machine without a GPU.

    python benchmarks/compiled_kernels.py [--model groupmamba|swin] [--arch tiny] [--size 800 1344]
                                          [--inductor-options '{"combo_kernels": false}'] [--top 25]
                                          [--save-code DIR] [--regional] [--no-memo]

The compiled detection step (bs 2, 800x1344, AMP fp16, forward + backward) is bound by its host: Inductor's
Python wrapper issues every launch, so their number sets the step time (README, #14). Counting them needs the
code Inductor generates, and GPU time is scarce; this script gets that code on the CPU:

1. the joint forward + backward graph is traced with fake tensors on the CPU device, the fused ops on their
   Triton path (``MMGM_KERNELS=triton``, tilings sized for 132 multiprocessors), through AOTAutograd with
   Inductor's decompositions and its min-cut partitioner, as ``torch.compile`` would;
2. both graphs are moved to a CUDA device that is not there: the device properties Inductor asks for are an
   H200's, Triton's target is sm_90 (the same pretence as ``kernel_registers.py``), and random ops fall back
   to ATen (``fallback_random``: Inductor decomposes them for real GPUs only);
3. Inductor compiles each graph. Writing its wrapper module succeeds; loading the kernels then fails (no
   driver), which is expected and reported, not raised.

The wrappers' ``call()`` functions are then read: every ``.run(`` is one Triton launch (Inductor's generated
kernels by kind: pointwise, reduction, persistent reduction, foreach, a combo kernel by its name's kind; ours by
kernel name), every ``extern_kernels.*`` call one library launch (cuBLAS may launch two for a split-K matmul).
Both graphs are compiled in the backbones' compile context (``models/compiled.py``). Printed: launches by kind
for the forward and backward graphs; the wrappers' statements, each run in Python at every step (buffer
allocations, tensor reinterpretations, input checks, the arguments the launches pass), a CPU proxy for the host
work besides the launch count; Inductor's estimate of each graph's peak memory, before and after its combo
kernels (its memory gate on combo kernels, where the release has one, is an Inductor option:
``combo_kernel_peak_memory_pct_threshold``); the generated kernels grouped by the ATen ops they were fused from
(Inductor's "Original ATen" comments), most frequent first; and the pointwise kernels whose elements issue the most
loads, which a launch count cannot show (a concatenation of many pieces: GroupMamba-B's 378-piece one took 95 ms of
a det step on an H100, README's thirty-first session).

``--regional`` compiles GroupMamba block by block instead (PyTorch's regional compilation, as
``regional_compile.py`` runs it): one block per stage is traced and compiled at its det-size map, and its
launches and statements count once per block of its stage; the compile time is the four block graphs'.

Checked against the H200 (eleventh session, commit 2deeca8): Inductor's own wrapper for GroupMamba-T's det
step, read the same way, launched 2241 kernels there; this script lists 2170 (the GPU decomposes stochastic
depth's bernoulli into more kernels). Swin-T: 890 here, 931 by the profiler on the H200. An analysis tool: it
patches torch's device queries in its own process only.
"""
import argparse
import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop('TRITON_INTERPRET', None)  # Inductor needs the kernels' TTIR, which interpreted kernels lack
os.environ['MMGM_KERNELS'] = 'triton'

import torch  # noqa: E402

from wrapper_code import STATEMENTS, launches, widest_elements, wrapper_statements  # noqa: E402

WIDEST_ROWS = 5
H200 = dict(name='NVIDIA H200', major=9, minor=0, multi_processor_count=132, total_memory=143771336704,
            warp_size=32, max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
            max_threads_per_block=1024, shared_memory_per_block=49152, shared_memory_per_block_optin=232448,
            shared_memory_per_multiprocessor=233472, L2_cache_size=52428800, clock_rate=1980000,
            memory_clock_rate=3201000, memory_bus_width=5120, gcnArchName='', is_integrated=False, uuid='none',
            pci_bus_id=0, pci_device_id=0, pci_domain_id=0)


def pretend_h200():
    """Answer Inductor's and Triton's device queries as an H200 would, in this process (no driver needed)."""
    import types

    import triton
    from triton.backends.compiler import GPUTarget

    props = types.SimpleNamespace(**H200)
    # Before Inductor's modules are imported: some take these functions by name.
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.get_device_capability = lambda device=None: (props.major, props.minor)
    torch.cuda.get_device_name = lambda device=None: props.name
    torch.cuda.current_device = lambda: 0
    torch.cuda._lazy_init = lambda: None
    torch.cuda._is_compiled = lambda: True
    torch.cuda.get_rng_state = lambda device='cuda': torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device='cuda': None
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as torch_triton
    from torch._dynamo import device_interface
    torch_triton.has_triton = scheduler.has_triton = lambda: True
    interface = device_interface.CudaInterface
    interface.Worker.get_device_properties = staticmethod(lambda device=None: props)
    interface.raise_if_triton_unavailable = staticmethod(lambda device=None: None)
    interface.is_triton_capable = staticmethod(lambda device=None: True)

    class Sm90:
        def get_current_target(self):
            return GPUTarget('cuda', 90, 32)

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return torch.device('cuda', 0)

    triton.runtime.driver.set_active(Sm90())

    from mmgroupmamba.kernels import dispatch
    dispatch.require_triton_runnable = lambda device: None  # the fake tensors are on the CPU device
    # The launchers size their tilings for the device of their (CPU) tensors: an H200's count instead.
    for name in ('triton_scan', 'triton_dwconv', 'triton_affinity', 'triton_gated_norm'):
        module = __import__(f'mmgroupmamba.kernels.{name}', fromlist=['_'])
        module.multiprocessors = lambda device, interpreted=1: props.multi_processor_count
    for name in ('scan', 'gated_norm', 'dwconv', 'affinity'):
        module = __import__(f'mmgroupmamba.kernels.{name}', fromlist=['_'])
        module.triton_module = lambda launcher, device: dispatch._import_launcher(launcher)


def build(model, arch):
    if model == 'groupmamba':
        from mmgroupmamba import GroupMamba
        return GroupMamba(arch=arch, drop_path_rate=0.2, out_indices=(0, 1, 2, 3))
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    from backbone_speed import NAMES, swin_config  # imported here: after pretend_h200, as mmgroupmamba must be
    sizes = {name: size for size, name in NAMES.items()}
    if arch not in sizes:
        raise KeyError(f'--arch {arch!r}: the Swin sizes are {sorted(sizes)}')
    cfg, _ = swin_config(sizes[arch], 0.2)  # mmdet's Swin of that size, as backbone_speed.py builds it
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


def trace_graphs(backbone, input_shape):
    """The forward and backward graphs AOTAutograd hands Inductor for one AMP fp16 step of ``backbone`` (a
    backbone on an image batch, or one block on its map) on an input of ``input_shape``, with their example
    inputs (fake, CPU)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    from mmgroupmamba import GroupMamba

    backbone.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.randn(*input_shape)
        if isinstance(backbone, GroupMamba):
            # GroupMamba.forward converts the image before its compiled graph, as here before the trace.
            images = images.to(torch.float16, memory_format=torch.channels_last)
        params = {n: torch.empty(p.shape, dtype=p.dtype).requires_grad_() for n, p in backbone.named_parameters()}
        buffers = {n: torch.zeros(b.shape, dtype=b.dtype) for n, b in backbone.named_buffers()}
        names = [*params, *buffers]

        def step(images, *tensors):
            out = torch.func.functional_call(backbone, dict(zip(names, tensors)), (images,))
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        compiled = aot_function(step, fw_compiler=capture, bw_compiler=capture,
                                partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
        with torch.autocast('cpu', dtype=torch.float16):
            outs = compiled(images, *params.values(), *buffers.values())
        torch.autograd.backward(outs, [torch.ones(o.shape, dtype=o.dtype) for o in outs])
    return graphs


def to_cuda(gm):
    """The graph with every CPU device argument (factory calls) made ``cuda:0``."""
    cuda = torch.device('cuda', 0)

    def move(value):
        return cuda if isinstance(value, torch.device) and value.type == 'cpu' else value

    for node in gm.graph.nodes:
        node.args = tuple(move(a) for a in node.args)
        node.kwargs = {k: move(v) for k, v in node.kwargs.items()}
    gm.recompile()
    return gm


@contextlib.contextmanager
def combo_peaks_recorded(record):
    """Inductor's own estimate of each compiled graph's peak memory (its memory planner's, from buffer sizes and
    lifetimes in the schedule), before and after it forms combo kernels, appended to ``record`` as ``(before,
    after)`` in bytes: a combo kernel takes its earliest member's place, and the kernels it pulls ahead keep buffers
    alive longer. Patched in this process only."""
    from torch._inductor import memory, scheduler
    from torch._inductor.virtualized import V
    from torch.utils._ordered_set import OrderedSet

    original = scheduler.Scheduler.create_combo_kernel_nodes

    def peak(sched):
        estimate, _ = memory.prepare_planning_info(sched.nodes, sched.name_to_buf, sched.name_to_fused_node,
                                                   OrderedSet(V.graph.graph_inputs.keys()),
                                                   OrderedSet(V.graph.get_output_names()))
        return estimate

    def recorded(sched, *args, **kwargs):
        before = peak(sched)
        original(sched, *args, **kwargs)
        record.append((before, peak(sched)))

    scheduler.Scheduler.create_combo_kernel_nodes = recorded
    try:
        yield
    finally:
        scheduler.Scheduler.create_combo_kernel_nodes = original


def wrapper_files(cache_dir):
    """The Python modules in Inductor's code cache: ``<cache_dir>/<two characters of the hash>/<hash>.py``.
    Not a recursive walk: Triton's compile workers create and remove temporary directories under
    ``<cache_dir>/triton`` while it runs, and a walk that lists one of them just before it goes fails."""
    return set(Path(cache_dir).glob('??/*.py'))


def compile_for_h200(graphs, cache_dir, inductor_options):
    """Inductor's wrapper source for each graph (forward, backward), from its cache directory."""
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    inductor_config.fallback_random = True
    for key, value in inductor_options.items():
        if not hasattr(inductor_config, key):
            raise KeyError(f'unknown Inductor option {key!r}')
        setattr(inductor_config, key, value)
    sources = []
    for index, (gm, inputs) in enumerate(graphs):
        before = wrapper_files(cache_dir)
        with FakeTensorMode(allow_non_fake_inputs=True):
            cuda_inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device='cuda')
                           if isinstance(t, torch.Tensor) else t for t in inputs]
        try:
            compile_fx_inner(to_cuda(gm), cuda_inputs, is_backward=index == 1)
        except Exception as exc:  # loading the compiled kernels needs a driver; the code is written by then
            print(f'graph {index}: compiled, then stopped without a GPU: {exc!r:.300}', file=sys.stderr)
        wrappers = [p for p in wrapper_files(cache_dir) - before if 'def call(' in p.read_text()]
        if len(wrappers) != 1:
            raise RuntimeError(f'graph {index}: expected one wrapper module, found {len(wrappers)}')
        sources.append(wrappers[0].read_text())
    return sources


@contextlib.contextmanager
def mutation_analysis_timed(record):
    """Time, in this process, PyTorch's analysis of which arguments each user-defined Triton kernel launch
    writes (``identify_accessed_tensors``: the kernel compiled to TTIR and walked). It runs once per launch site
    and consumer (functionalization, Inductor's lowering), with no cache (pytorch/pytorch#193227 proposes
    one). ``record`` gets ``calls``, ``seconds`` and ``distinct``: the kernels and constant arguments analysed,
    what a cache keyed by them would analyse."""
    from torch._higher_order_ops import triton_kernel_wrap

    original = triton_kernel_wrap.identify_accessed_tensors

    def dtype_of(value):  # a tensor's (or Inductor TensorBox's) dtype: TTIR depends on it
        return getattr(value, 'dtype', None) or (value.get_dtype() if hasattr(value, 'get_dtype') else None)
    keys = set()
    record.update(calls=0, seconds=0.0)

    def timed(kernel, kwargs, *args, **kw):
        name = getattr(getattr(kernel, 'fn', kernel), '__name__', repr(kernel))
        keys.add((name, tuple(sorted((k, v if isinstance(v, (bool, int, float, str)) else str(dtype_of(v)))
                                     for k, v in kwargs.items()))))
        start = time.perf_counter()
        try:
            return original(kernel, kwargs, *args, **kw)
        finally:
            record['calls'] += 1
            record['seconds'] += time.perf_counter() - start

    triton_kernel_wrap.identify_accessed_tensors = timed
    try:
        yield
    finally:
        triton_kernel_wrap.identify_accessed_tensors = original
        record['distinct'] = len(keys)


def stage_blocks(backbone, size):
    """``[(block, its input shape, blocks of that shape)]``, one per stage of a GroupMamba at bs 2 and image
    ``size``: the stem divides the map by 4, each downsampling conv (3x3, stride 2, padding 1) halves it, rounding
    up."""
    height, width = -(-size[0] // 4), -(-size[1] // 4)
    rows = []
    for stage in range(backbone.num_stages):
        blocks = getattr(backbone, f'block{stage + 1}')
        rows.append((blocks[0], (2, height, width, backbone.embed_dims[stage]), len(blocks)))
        height, width = -(-height // 2), -(-width // 2)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', choices=('groupmamba', 'swin'), default='groupmamba')
    parser.add_argument('--arch', default='tiny', help='GroupMamba arch; for Swin: tiny, small or base')
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1344))
    parser.add_argument('--inductor-options', type=json.loads, default=None,
                        help='Inductor options as JSON; default: those the model is compiled with (GroupMamba: '
                        'COMPILE_INDUCTOR_DEFAULTS, Swin-T: none)')
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--save-code', metavar='DIR', help='also write the two wrapper modules there')
    parser.add_argument('--regional', action='store_true',
                        help='GroupMamba compiled block by block: one block per stage traced and compiled, its '
                        'launches counted once per block of the stage (stem, downsampling and norms left out)')
    parser.add_argument('--no-memo', action='store_true',
                        help='compile outside the backbones\' compile context (compiled.compile_context): '
                        'PyTorch analyses every launch site of our Triton kernels anew, and traces the modules\' '
                        'floats as symbolic inputs (a restart of the analysis where our ops specialise them)')
    args = parser.parse_args(argv)
    if args.regional and (args.model != 'groupmamba' or args.save_code):
        parser.error('--regional compiles GroupMamba blocks, and writes no wrapper modules')
    cache_dir = tempfile.mkdtemp(prefix='compiled_kernels_')
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache_dir  # a fresh cache: every graph is compiled, none reloaded
    try:
        pretend_h200()  # before mmgroupmamba's import: device queries answered from then on are an H200's
        if args.inductor_options is None:
            from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS
            args.inductor_options = dict(COMPILE_INDUCTOR_DEFAULTS) if args.model == 'groupmamba' else {}
        from mmgroupmamba.models.compiled import compile_context
        analysis = {}
        backbone = build(args.model, args.arch)
        # What is compiled, and how often each compiled graph runs in a step.
        parts = (stage_blocks(backbone, args.size) if args.regional
                 else [(backbone, (2, 3, *args.size), 1)])
        counts = [(collections.Counter(), collections.Counter()) for _ in range(2)]
        statements = [collections.Counter() for _ in range(2)]
        widest = [[], []]
        seconds = collections.Counter()
        # Compiled in the backbones' compile contexts, as their ``compile`` option runs, unless told otherwise. The
        # write analyses timed are those PyTorch performs: with the memo, once per kernel and arguments' key; with
        # --no-memo once per launch site and consumer, as plain torch.compile does (floats symbolic too).
        memo = contextlib.nullcontext() if args.no_memo else compile_context()
        peaks = []
        with mutation_analysis_timed(analysis), memo, combo_peaks_recorded(peaks):
            for module, input_shape, repeats in parts:
                start = time.perf_counter()
                graphs = trace_graphs(module, input_shape)
                if len(graphs) != 2:
                    raise RuntimeError(f'expected a forward and a backward graph, got {len(graphs)}')
                traced = time.perf_counter()
                sources = compile_for_h200(graphs, cache_dir, args.inductor_options)
                seconds.update(trace=traced - start, inductor=time.perf_counter() - traced)
                for phase, source in enumerate(sources):
                    by_kind, by_origin = launches(source)
                    for counter, found in zip(counts[phase], (by_kind, by_origin)):
                        counter.update({key: n * repeats for key, n in found.items()})
                    statements[phase].update({key: n * repeats for key, n in wrapper_statements(source).items()})
                    widest[phase] += widest_elements(source, WIDEST_ROWS)
        if args.save_code:
            Path(args.save_code).mkdir(parents=True, exist_ok=True)
            for phase, source in zip(('forward', 'backward'), sources):
                (Path(args.save_code) / f'{phase}.py').write_text(source)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    name = f'GroupMamba-{args.arch}' if args.model == 'groupmamba' else f'Swin-{args.arch} (mmdet)'
    if args.regional:
        name += (f' compiled block by block ({len(parts)} block graphs for {sum(r for _, _, r in parts)} blocks; '
                 'stem, downsampling and stage norms eager, not counted)')
    print(f'{name}, bs 2 at {args.size[0]}x{args.size[1]}, AMP fp16, Inductor options {args.inductor_options}; '
          f'kernel launches in the compiled wrappers (fake H200)')
    kinds = sorted(set(counts[0][0]) | set(counts[1][0]), key=lambda k: -(counts[0][0][k] + counts[1][0][k]))
    print('| launches | forward | backward | both |')
    print('| --- | ---: | ---: | ---: |')
    for kind in kinds:
        fwd, bwd = counts[0][0][kind], counts[1][0][kind]
        print(f'| {kind} | {fwd} | {bwd} | {fwd + bwd} |')
    fwd, bwd = (sum(c[0].values()) for c in counts)
    print(f'| **total** | **{fwd}** | **{bwd}** | **{fwd + bwd}** |')
    print('\n| wrapper statements (host work per step) | forward | backward | both |')
    print('| --- | ---: | ---: | ---: |')
    for kind in ('statements', 'launches', 'launch arguments', *(k for k, _ in STATEMENTS)):
        fwd, bwd = statements[0][kind], statements[1][kind]
        print(f'| {kind} | {fwd} | {bwd} | {fwd + bwd} |')
    if peaks:
        print("\nInductor's peak-memory estimate of each graph (MiB), before its combo kernels -> after: " +
              ', '.join(f'{before / 2**20:.0f} -> {after / 2**20:.0f}' for before, after in peaks))
    print(f'\nCompile time on this CPU: tracing (Dynamo aside) {seconds["trace"]:.0f} s, Inductor '
          f'{seconds["inductor"]:.0f} s (its kernels are not compiled here); in both, the write analysis of '
          f'user-defined Triton launches {analysis["seconds"]:.0f} s in {analysis["calls"]} calls, for '
          f'{analysis["distinct"]} distinct kernels and constant arguments')
    for phase, (_, by_origin) in zip(('forward', 'backward'), counts):
        print(f'\n{phase}: Inductor kernels by the ATen ops they fuse (top {args.top})')
        for origin, n in by_origin.most_common(args.top):
            print(f'  {n:4d}  {origin}')
    for phase, found in zip(('forward', 'backward'), widest):
        print(f'\n{phase}: pointwise kernels by the loads each element issues, most load instructions first (a '
              f'concatenation of N pieces issues N: wrapper_code.widest_elements)')
        for loads, elements, kernel in sorted(found, key=lambda f: -f[0] * f[1])[:WIDEST_ROWS]:
            print(f'  {loads:4d} loads x {elements:>10d} elements  {kernel}')


if __name__ == '__main__':
    main()

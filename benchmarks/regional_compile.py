"""Compile time and step time of GroupMamba compiled whole (its ``compile`` option) or block by block (regional).

    python benchmarks/regional_compile.py --mode {whole,regional} [--arch tiny] [--batch 2] [--size 800 1344]
                                          [--steps 10] [--dynamic] [--compile-options JSON]

The backbone's ``compile`` option traces the whole backbone into one graph: on an H200 its det step took 233-276 s
to compile (fifteenth session), 40% of that in PyTorch's analysis of every launch site of our Triton kernels
(``compiled_kernels.py``). Its 19 blocks come in four shapes, one per stage. Compiled block by block (PyTorch's
regional compilation: each ``GroupMambaBlock``'s forward through a ``CompiledForward`` of its own, the stem,
downsampling and stage norms eager), Dynamo traces a stage's first block and its second (which takes the first's
FFN branch, still to be added in its input norm's pass) and reuses the second's graph for the stage's later blocks
(their parameters are inputs, not constants), so Inductor compiles up to eight block graphs and the analysis runs
over their launch sites. The cost: each block call goes through a compiled region's guards and wrappers, and
nothing fuses across blocks. This script measures both sides for one mode per process (compiled code is cached per
process): the first step's time (the compile), the steady step time, the graphs compiled, and the outputs and
parameter gradients against the eager model's on the same input. ``--compile-options``: ``torch.compile`` arguments
over the backbone's own (``{"options": {...}}`` for Inductor's), the same in both modes.

On CUDA the step is the det step of ``backbone_speed.py`` (AMP fp16, a loss over all outputs, backward); on the
CPU, fp32 (the fused ops then run their PyTorch reference, which compiles quite differently from the Triton
path: run it on a GPU for the numbers that matter).
"""
import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

from mmgroupmamba.models.compiled import CompiledForward
from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS, GroupMamba, GroupMambaBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_check import Comparison  # noqa: E402


def compile_blocks(backbone, options):
    """Compiles each ``GroupMambaBlock`` of ``backbone`` on its own, as the backbone's ``compile`` option compiles
    the whole (a ``CompiledForward`` per block: the same ``torch.compile`` arguments and Inductor defaults, and the
    same compile context, ``compiled.compile_context``)."""
    for module in backbone.modules():
        if isinstance(module, GroupMambaBlock):
            module.forward = functools.partial(
                CompiledForward('GroupMambaBlock', options, COMPILE_INDUCTOR_DEFAULTS), module.forward)


def build(arch, mode, dynamic, compile_options=None):
    torch.manual_seed(0)
    options = dict(dynamic=dynamic, fullgraph=True, **(compile_options or {}))
    eager = GroupMamba(arch=arch, drop_path_rate=0.0)
    if mode == 'whole':
        model = GroupMamba(arch=arch, drop_path_rate=0.0, compile=options)
        model.load_state_dict(eager.state_dict())
    else:
        model = copy.deepcopy(eager)
        compile_blocks(model, options)
    return eager, model


def step_fn(model, images):
    amp = images.is_cuda

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
            outs = model(images)
            loss = sum(o.float().mean() for o in outs)
        loss.backward()
        return outs

    return step


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=('whole', 'regional'), required=True)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1344))
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--dynamic', action='store_true', help='symbolic sizes (default: static)')
    parser.add_argument('--compile-options', type=json.loads, default={},
                        help='torch.compile arguments (JSON) over the backbone\'s own, e.g. {"options": {...}}')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch._dynamo.utils.counters.clear()
    eager, model = build(args.arch, args.mode, args.dynamic, args.compile_options)
    eager, model = eager.to(device).train(), model.to(device).train()
    images = torch.randn(args.batch, 3, *args.size, device=device)
    step = step_fn(model, images)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    steady = (time.perf_counter() - start) / args.steps
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    # AMP fp16 on CUDA, as the timed step; fp32 on the CPU, where the fused ops run their reference.
    result = Comparison(eager, model, images, amp=images.is_cuda)
    print(f'{args.mode}: GroupMamba-{args.arch}, batch {args.batch} at {args.size[0]}x{args.size[1]} on {device}, '
          f'{"dynamic" if args.dynamic else "static"} sizes, options {args.compile_options}: '
          f'first step (compiling) {first:.1f} s, then {steady * 1000:.1f} ms a step; {graphs} graphs compiled; '
          f'against eager: {result}{"" if result.ok() else " (OUT OF BOUNDS)"}', flush=True)


if __name__ == '__main__':
    main()

"""Compile time and step time of GroupMamba compiled whole (its ``compile`` option) or block by block (regional).

    python benchmarks/regional_compile.py --mode {whole,regional} [--arch tiny] [--batch 2] [--size 800 1344]
                                          [--steps 10] [--dynamic] [--compile-options JSON]

The backbone's ``compile`` option traces the whole backbone into one graph: on an H200 its det step took 233-276
s to compile (fifteenth session), 40% of that in PyTorch's analysis of every launch site of our Triton kernels
(``compiled_kernels.py``). Its 19 blocks come in four shapes, one per stage. Compiled block by block (PyTorch's
regional compilation: ``block.compile()`` on each ``GroupMambaBlock``, the stem, downsampling and stage norms
eager), Dynamo traces one block per shape and reuses that graph for the stage's other blocks (their parameters
are inputs, not constants), so Inductor compiles four block graphs and the analysis runs over four blocks'
launch sites. The cost: each block call goes through a compiled region's guards and wrappers, and nothing fuses
across blocks. This script measures both sides for one mode per process (compiled code is cached per process):
the first step's time (the compile), the steady step time, the graphs compiled, and the outputs and parameter
gradients against the eager model's on the same input. ``--compile-options``: ``torch.compile`` arguments over the
backbone's own (``{"options": {...}}`` for Inductor's), the same in both modes.

On CUDA the step is the det step of ``backbone_speed.py`` (AMP fp16, a loss over all outputs, backward); on the
CPU, fp32 (the fused ops then run their PyTorch reference, which compiles quite differently from the Triton
path: run it on a GPU for the numbers that matter).
"""
import argparse
import copy
import json
import time

import torch

from mmgroupmamba.models.compiled import CompiledForward
from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS, GroupMamba, GroupMambaBlock


def compile_blocks(backbone, **options):
    """Compiles each ``GroupMambaBlock`` of ``backbone`` on its own (``nn.Module.compile``)."""
    for module in backbone.modules():
        if isinstance(module, GroupMambaBlock):
            module.compile(**options)


def build(arch, mode, dynamic, compile_options=None):
    torch.manual_seed(0)
    options = dict(dynamic=dynamic, fullgraph=True, **(compile_options or {}))
    eager = GroupMamba(arch=arch, drop_path_rate=0.0)
    if mode == 'whole':
        model = GroupMamba(arch=arch, drop_path_rate=0.0, compile=options)
        model.load_state_dict(eager.state_dict())
    else:
        model = copy.deepcopy(eager)
        # The torch.compile arguments the backbone's own option would pass (its Inductor defaults included).
        compile_blocks(model, **CompiledForward('GroupMambaBlock', options, COMPILE_INDUCTOR_DEFAULTS).options)
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


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def outputs_and_grads(model, images, amp, loss_scale):
    """The outputs and the parameter gradients (by name, fp32, unscaled) of one forward + backward of ``model``
    with a loss that weighs every output element by a fixed random number (the mean of a LayerNorm's output, the
    timed step's loss, leaves most gradients at rounding noise); under AMP fp16 when ``amp``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        out = model(images)
    generator = torch.Generator(images.device).manual_seed(0)
    weights = [torch.randn(o.shape, generator=generator, device=o.device) for o in out]
    (sum((o.float() * w).mean() for o, w in zip(out, weights)) * loss_scale).backward()
    grads = {name: p.grad.float() / loss_scale for name, p in model.named_parameters() if p.grad is not None}
    return [o.detach().float() for o in out], grads


def compare(eager, model, images, loss_scale=2.0 ** 16):
    """Largest relative difference of the outputs and of the parameter gradients (and whose), compiled against
    eager, both under AMP on CUDA; there, also that parameter's gradient error of each against eager in fp32.

    The loss is multiplied by ``loss_scale`` (GradScaler's initial scale) before backward, as AMP training does:
    the mean over a det step's first output (8.6 million elements for T) gives each element a gradient of about
    1e-7, below fp16's smallest normal number, and unscaled fp16 backward passes then compare flushed and
    rounded-away values (the sixteenth session's first H200 run printed a worst gradient of 1.1e+01 that way)."""
    amp = images.is_cuda
    (outs_e, grads_e), (outs_c, grads_c) = (outputs_and_grads(m, images, amp, loss_scale) for m in (eager, model))
    out_err = max(rel_err(a, b) for a, b in zip(outs_c, outs_e))
    errs = {name: rel_err(grads_c[name], grads_e[name]) for name in grads_e if name in grads_c}
    worst = max(errs, key=errs.get)
    against_fp32 = None
    if amp:
        grad_fp32 = outputs_and_grads(eager, images, False, loss_scale)[1][worst]
        against_fp32 = (rel_err(grads_e[worst], grad_fp32), rel_err(grads_c[worst], grad_fp32))
    return out_err, worst, errs[worst], against_fp32


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
    out_err, worst, grad_err, against_fp32 = compare(eager, model, images)
    print(f'{args.mode}: GroupMamba-{args.arch}, batch {args.batch} at {args.size[0]}x{args.size[1]} on {device}, '
          f'{"dynamic" if args.dynamic else "static"} sizes, options {args.compile_options}: '
          f'first step (compiling) {first:.1f} s, then '
          f'{steady * 1000:.1f} ms a step; {graphs} graphs compiled; against eager: outputs {out_err:.1e}, '
          f'worst parameter gradient {grad_err:.1e} ({worst})'
          + ('' if against_fp32 is None else
             f'; that gradient against eager fp32: eager AMP {against_fp32[0]:.1e}, '
             f'compiled AMP {against_fp32[1]:.1e}'),
          flush=True)


if __name__ == '__main__':
    main()

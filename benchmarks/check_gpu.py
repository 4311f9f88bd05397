"""GPU correctness of GroupMamba with the Triton kernels, before any timing.

    python benchmarks/check_gpu.py [--compile [static|dynamic]] [--compile-options JSON] [--amp-steps 1000]
                                   [--bf16-steps 300] [--amp-cuda-graph] [--only CHECK [CHECK ...]]

1. The golden official outputs (``../shared/golden`` or ``--golden``), fp32 on the GPU (TF32 off): <= 1e-4.
2. GroupMamba-T on the GPU, Triton path against the PyTorch reference path (``MMGM_KERNELS=reference``):
   outputs and every parameter gradient, fp32.
2b. ``--compile [static|dynamic]``: opcheck of every fused op on CUDA, then ``compile=True`` (Inductor, dynamic
   sizes; ``static``: one size, ``dynamic=False``) against eager, in two checks, fp32 (``compile``) and AMP fp16
   (``compile-amp``), each a compile of a few minutes: three input sizes of one batch size (torch specialises a
   batch of 1, which compiles once more), one of them with a stage-4 map of <= 32 tokens (a single scan
   checkpoint; a dimension of 1 there was a guard): outputs and every gradient (under AMP the loss scaled as
   GradScaler scales it, and each gradient judged against eager fp32 beside eager AMP's there, over the input and
   perturbed copies of it: ``gradient_check.py``),
   and the number of graphs each compiled (one, not one per size). ``--compile-options``: torch.compile
   arguments over those, as ``backbone_speed.py`` takes them (e.g. ``'{"options": {"cpp_wrapper": true}}'``:
   Inductor's C++ wrapper).
3. CUDA graphs (``cuda_graph=True``) against eager, from the same weights: AdamW training steps under AMP
   over two alternating input sizes (losses, parameters, BatchNorm statistics), an eval forward, stochastic
   depth drawing fresh masks per replay, two forwards before one backward (the eager fallback), and
   ``frozen_stages=1`` (an output without gradient).
4. ``--amp-steps`` random AMP fp16 (and ``--bf16-steps`` bf16) forward/backward steps at the detection size
   (bs 2, 800x1344), with random weights re-drawn every 100 steps: the loss and every gradient must stay
   finite. ``--amp-cuda-graph`` runs them replayed from CUDA graphs (the same kernels, without the host's launch cost).

Every check runs, also after one has failed; the script then exits non-zero naming the failed ones. ``--only``
runs the checks named (``golden``, ``reference``, ``padded``, ``opcheck``, ``compile`` (fp32), ``compile-amp``,
``graphs``, ``steps``) and no others.
"""
import argparse
import copy
import functools
import json
import os
import sys
from pathlib import Path

import torch

from mmgroupmamba import GroupMamba
from mmgroupmamba.models.compiled import CompiledForward
from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_check import Comparison, rel_err  # noqa: E402


def check_golden(path):
    golden = torch.load(path, weights_only=True)
    model = GroupMamba(arch=golden['arch_cfg']).cuda().eval()
    model.load_state_dict(golden['state_dict'], strict=False)
    with torch.no_grad():
        outs = model(golden['input'].cuda())
    errors = [rel_err(o.cpu(), e) for o, e in zip(outs, golden['stage_outputs'])]
    print('golden stage rel errors (GPU, Triton):', ['%.2e' % e for e in errors])
    assert max(errors) <= 1e-4


def ramp_loss(outs):
    """A loss whose gradient differs at every output element (a plain sum would give uniform gradients)."""
    return sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).mean() for o in outs)


def run_with(impl, model, x):
    os.environ['MMGM_KERNELS'] = impl
    model.zero_grad(set_to_none=True)
    outs = model(x)
    ramp_loss(outs).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [o.detach() for o in outs], grads


def compare_runs(run_a, run_b):
    """``(output error, worst parameter, its gradient error)`` of two ``run_with`` results."""
    (outs_a, grads_a), (outs_b, grads_b) = run_a, run_b
    os.environ.pop('MMGM_KERNELS')
    out_err = max(rel_err(a, b) for a, b in zip(outs_a, outs_b))
    grad_errs = {n: rel_err(grads_a[n], grads_b[n]) for n in grads_b if grads_b[n].norm() > 0}
    worst = max(grad_errs, key=grad_errs.get)
    return out_err, worst, grad_errs[worst]


def check_against_reference():
    torch.manual_seed(0)
    model = GroupMamba(arch='tiny').cuda().train()
    x = torch.randn(2, 3, 160, 224, device='cuda')
    out_err, worst, grad_err = compare_runs(run_with('triton', model, x), run_with('reference', model, x))
    print(f'T, Triton vs reference (fp32): outputs {out_err:.2e}, worst gradient {worst} {grad_err:.2e}')
    assert out_err <= 1e-4 and grad_err <= 1e-3


def check_padded_matches_unpadded():
    """T with stage 3 stored padded (348 channels as 352, kernels/layout.py) against the same weights unpadded,
    Triton kernels, fp32: the padding must change nothing."""
    torch.manual_seed(0)
    padded = GroupMamba(arch='tiny').cuda().train()
    plain = GroupMamba(arch='tiny', channel_multiple=1).cuda().train()
    plain.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 160, 224, device='cuda')
    out_err, worst, grad_err = compare_runs(run_with('triton', padded, x), run_with('triton', plain, x))
    print(f'T, stage 3 padded ({padded.stored_dims[2]}) vs unpadded, Triton fp32: outputs {out_err:.2e}, worst '
          f'gradient {worst} {grad_err:.2e}')
    assert padded.stored_dims[2] == 352 and out_err <= 1e-4 and grad_err <= 1e-3


def check_opcheck():
    """torch.library.opcheck of every fused op on CUDA tensors: there the Triton ops are traced into the
    graph (wrap_triton), which the CPU tests cannot reach."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
    from op_samples import opcheck_every_op
    opcheck_every_op(torch.Generator().manual_seed(0), 'cuda')
    print('opcheck on CUDA: every op passes', flush=True)


def check_compile(dynamic, options=None, autocast=False, sizes=((2, 160, 224), (2, 192, 160), (2, 224, 288))):
    """compile=True (Inductor, GroupMamba's Inductor defaults, ``options`` over them; ``dynamic``: symbolic sizes,
    one graph) against eager: outputs and gradients in fp32, or under AMP fp16 (``autocast``), and (dynamic) new
    sizes reuse the compiled graph. fp32 and AMP are two checks, each one compile of a few minutes on an H100, so
    that each fits one call."""
    torch.manual_seed(0)
    eager = GroupMamba(arch='tiny').cuda().train()
    compiled = copy.deepcopy(eager)
    compiled._compiled = CompiledForward('GroupMamba', {**(options or {}), 'dynamic': dynamic},
                                         COMPILE_INDUCTOR_DEFAULTS)
    if not dynamic:
        sizes = sizes[:1]
    # Dynamo keeps the graphs per code object, for every model in the process: count this check's own.
    graphs_before = compiled_graphs()
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, device='cuda')
        result = Comparison(eager, compiled, x, amp=autocast)
        print(f'T, compiled vs eager ({"AMP fp16" if autocast else "fp32"}, {batch}x{height}x{width}): {result}',
              flush=True)
        assert result.ok(), result
    graphs = compiled_graphs() - graphs_before
    print(f'T, compiled graphs for {len(sizes)} sizes ({"AMP fp16" if autocast else "fp32"}): {graphs}')
    assert graphs == 1, graphs


def compiled_graphs():
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(GroupMamba._forward.__code__))


def check_cuda_graphs(steps=6):
    torch.manual_seed(0)
    eager = GroupMamba(arch='tiny').cuda().train()
    graphed = GroupMamba(arch='tiny', cuda_graph=True).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    inputs = [torch.randn(2, 3, 224, 224, device='cuda'), torch.randn(2, 3, 160, 288, device='cuda')]
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)}
    losses = {eager: [], graphed: []}
    for step in range(steps):
        for model, optimizer in optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=torch.float16):
                outs = model(inputs[step % 2])
            loss = ramp_loss(outs)
            loss.backward()
            optimizer.step()
            losses[model].append(loss.item())
    loss_err = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses[eager], losses[graphed]))
    params_e, params_g = dict(eager.named_parameters()), dict(graphed.named_parameters())
    param_err = max(rel_err(params_g[n], params_e[n]) for n in params_e)
    # The models' state: persistent buffers only (GroupMamba's stochastic-depth keep rates are constants, and empty
    # at drop_path_rate=0).
    buffers_g, state = dict(graphed.named_buffers()), eager.state_dict()
    buffer_err = max(rel_err(buffers_g[n].float(), b.float()) for n, b in eager.named_buffers()
                     if b.is_floating_point() and n in state)
    eager.eval(), graphed.eval()
    with torch.no_grad():
        eval_err = max(rel_err(a, b) for a, b in zip(graphed(inputs[0]), eager(inputs[0])))
    print(f'CUDA graphs vs eager, {steps} AMP AdamW steps over 2 sizes: loss {loss_err:.1e}, parameters '
          f'{param_err:.1e}, BN statistics {buffer_err:.1e}, eval outputs {eval_err:.1e}; '
          f'{len(graphed._cuda_graphs.recorded)} signatures recorded')
    assert loss_err <= 1e-3 and param_err <= 1e-3 and buffer_err <= 1e-3 and eval_err <= 1e-3

    # Stochastic depth: each replay draws its own masks, the ones an eager pass draws from the same generator
    # state (recording leaves the generator as it found it: a resumed run replays the uninterrupted run's draws).
    torch.manual_seed(0)
    models = [GroupMamba(arch='tiny', drop_path_rate=0.5, cuda_graph=g).cuda().train() for g in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    x = inputs[0]
    draws = [[], []]
    for model, drawn in zip(models, draws):
        torch.cuda.manual_seed(1)
        for _ in range(3):
            outs = model(x)
            sum(o.sum() for o in outs).backward()
            drawn.append(outs[-1].detach())
        drawn.append(torch.cuda.get_rng_state())
    assert not torch.equal(draws[1][1], draws[1][2]), 'two replays with drop_path_rate=0.5 gave the same output'
    draw_err = max(rel_err(g, e) for g, e in zip(draws[1][:3], draws[0][:3]))
    print(f'stochastic depth, graphs vs eager from one generator state: outputs {draw_err:.1e}, generator states '
          f'{"equal" if torch.equal(draws[0][3], draws[1][3]) else "DIFFERENT"} after 3 steps')
    assert draw_err <= 1e-3 and torch.equal(draws[0][3], draws[1][3])

    # Two forwards before one backward: the second runs eagerly, and both gradients are right.
    for model in (eager, graphed):
        model.train().zero_grad(set_to_none=True)
        loss = sum(sum(o.float().square().mean() for o in model(x)) for x in inputs)
        loss.backward()
    grad_err = max(rel_err(params_g[n].grad, p.grad) for n, p in params_e.items() if p.grad.norm() > 0)
    print(f'two forwards before one backward: worst gradient {grad_err:.1e}')
    assert grad_err <= 1e-3

    # frozen_stages=1: the first output needs no gradient, the others do.
    torch.manual_seed(0)
    models = [GroupMamba(arch='tiny', frozen_stages=1, cuda_graph=g).cuda().train() for g in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    grads = []
    for model in models:
        for _ in range(2):  # the second call replays
            model.zero_grad(set_to_none=True)
            outs = model(inputs[0])
            ramp_loss(outs).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and not any(n.startswith('block1.') for n in grads[0])
    frozen_err = max(rel_err(grads[1][n], g) for n, g in grads[0].items() if g.norm() > 0)
    print(f'frozen_stages=1, graphs vs eager: worst gradient {frozen_err:.1e}')
    assert frozen_err <= 1e-3


def check_amp_steps(steps, dtype, cuda_graph, interval=100):
    model = GroupMamba(arch='tiny', drop_path_rate=0.2, cuda_graph=cuda_graph).cuda().train()
    params = list(model.parameters())
    x = torch.empty(2, 3, 800, 1344, device='cuda')
    for start in range(0, steps, interval):
        # Fresh random weights every `interval` steps; finiteness is gathered on the GPU and read once per
        # interval, so the check does not serialise every step.
        model.apply(lambda m: m.reset_parameters() if hasattr(m, 'reset_parameters') else None)
        finite = torch.ones((), dtype=torch.bool, device='cuda')
        for _ in range(min(interval, steps - start)):
            x.normal_(0, 1.5)
            with torch.autocast('cuda', dtype=dtype):
                loss = sum(o.float().square().mean() for o in model(x))
            model.zero_grad(set_to_none=True)
            loss.backward()
            # GradScaler's own multi-tensor check (scale 1): one launch for all ~1200 gradients.
            found_inf = torch.zeros((), device='cuda')
            torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params if p.grad is not None],
                                                             found_inf, torch.ones((), device='cuda'))
            finite &= torch.isfinite(loss) & (found_inf == 0)
        assert finite.item(), f'a loss or gradient was not finite in steps {start}..{start + interval - 1}'
    print(f'{steps} AMP {dtype} steps at bs 2, 800x1344{" (CUDA graphs)" if cuda_graph else ""}: loss and '
          'gradients finite')


# What --only names each check by.
CHECK_KEYS = ('golden', 'reference', 'padded', 'opcheck', 'compile', 'compile-amp', 'graphs', 'steps')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--golden', default=str(Path(__file__).resolve().parents[1].parent / 'shared' / 'golden'
                                                / 'golden_mini_seed0.pt'))
    parser.add_argument('--amp-steps', type=int, default=0)
    parser.add_argument('--bf16-steps', type=int, default=0)
    parser.add_argument('--amp-cuda-graph', action='store_true')
    parser.add_argument('--compile', choices=('static', 'dynamic'), nargs='?', const='dynamic', default=None,
                        help='also check compile=True against eager (static: one size, dynamic=False)')
    parser.add_argument('--compile-options', type=json.loads, default={},
                        help='torch.compile arguments for --compile (JSON), e.g. '
                        '\'{"options": {"cpp_wrapper": true}}\'')
    parser.add_argument('--only', nargs='+', choices=CHECK_KEYS, metavar='CHECK',
                        help=f'run these checks only (of {", ".join(CHECK_KEYS)}): a call whose time is short '
                        'spends it on the checks a change needs')
    args = parser.parse_args()
    if args.compile_options and not args.compile:
        parser.error('--compile-options is for the --compile check: give --compile static or --compile dynamic')
    if 'dynamic' in args.compile_options:
        parser.error('--compile-options: give dynamic by --compile static|dynamic, not in the options')
    checks = [('golden', 'golden', functools.partial(check_golden, args.golden)),
              ('reference', 'Triton against the reference', check_against_reference),
              ('padded', 'padded against unpadded', check_padded_matches_unpadded)]
    if args.compile:
        checks += [('opcheck', 'opcheck', check_opcheck),
                   ('compile', 'compiled against eager, fp32',
                    functools.partial(check_compile, args.compile == 'dynamic', args.compile_options)),
                   ('compile-amp', 'compiled against eager, AMP fp16',
                    functools.partial(check_compile, args.compile == 'dynamic', args.compile_options, autocast=True))]
    checks.append(('graphs', 'CUDA graphs', check_cuda_graphs_with_tf32))
    for steps, dtype in ((args.amp_steps, torch.float16), (args.bf16_steps, torch.bfloat16)):
        if steps:
            checks.append(('steps', f'{steps} {dtype} steps',
                           functools.partial(check_amp_steps, steps, dtype, args.amp_cuda_graph)))
    if args.only:
        unavailable = sorted(set(args.only) - {key for key, _, _ in checks})
        if unavailable:
            parser.error(f'--only {" ".join(unavailable)}: opcheck, compile and compile-amp need --compile, '
                         'steps needs --amp-steps or --bf16-steps')
        checks = [check for check in checks if check[0] in args.only]
    checks = [(name, check) for _, name, check in checks]
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for the comparisons
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name())
    failures = run_checks(checks)
    if failures:
        sys.exit(f'{len(failures)} of {len(checks)} checks failed: ' + '; '.join(name for name, _ in failures))
    print(f'all {len(checks)} checks passed')


def check_cuda_graphs_with_tf32():
    torch.backends.cudnn.allow_tf32 = True  # as training runs; the comparisons are graphs against eager
    check_cuda_graphs()


def run_checks(checks):
    """Run every ``(name, check)``, also after one fails: device time is scarce, and one failing check must not
    hide the results of those after it (the twenty-second session's compile check, failing, left the CUDA-graph
    checks unrun). A check's verdict is an AssertionError; any other exception is a bug and stops the run.
    Returns the failures as ``(name, message)``."""
    failures = []
    for name, check in checks:
        try:
            check()
        except AssertionError as error:
            print(f'FAILED {name}: {error}', flush=True)
            failures.append((name, str(error)))
    return failures


if __name__ == '__main__':
    main()

"""The compiled backbone (``compile=True``: Inductor, symbolic sizes) against eager over a sequence of input sizes,
on the CPU: outputs and parameter gradients of one step per size, and how many graphs Dynamo compiled.

    python benchmarks/compile_sizes_check.py [--arch mini] [--sizes 2x64x64 1x96x64 2x80x112]
                                             [--compile-options JSON] [--amp]

The Triton kernels do not run here (reference path; Inductor generates C++), so this checks what Dynamo,
AOTAutograd and Inductor do with the graph and its recompiles: the order of the sizes matters (duck sizing
specialises equal sizes, batch 1 is specialised, each guard failure compiles another graph). Fp32, no
stochastic depth; the loss weights every output element differently. The worst parameters are printed with their
relative error, gradient norm and largest entry. ``--amp`` instead judges each size under fp16 autocast as
``check_gpu.py --only compile-amp`` does on the GPU (``gradient_check.Comparison``: both AMP runs against eager
fp32, gradients that fp32 itself cannot resolve left to fp32), and fails where that check would.
"""
import argparse
import copy
import json
import time

import torch

from gradient_check import Comparison
from mmgroupmamba import GroupMamba
from mmgroupmamba.models.compiled import CompiledForward
from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='mini')
    parser.add_argument('--sizes', nargs='+', default=['2x64x64', '1x96x64', '2x80x112'], help='BxHxW')
    parser.add_argument('--compile-options', type=json.loads, default={})
    parser.add_argument('--worst', type=int, default=4)
    parser.add_argument('--amp', action='store_true', help="fp16 autocast, judged as check_gpu.py's AMP check")
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = GroupMamba(arch=args.arch).train()
    compiled = copy.deepcopy(eager)
    # GroupMamba's own compile option, wired as check_gpu.py wires it.
    compiled._compiled = CompiledForward('GroupMamba', args.compile_options, COMPILE_INDUCTOR_DEFAULTS)
    print(f'{args.arch}, {"AMP fp16" if args.amp else "fp32"}, compile options {compiled._compiled.options}')
    for size in args.sizes:
        batch, height, width = (int(n) for n in size.split('x'))
        x = torch.randn(batch, 3, height, width)
        if args.amp:
            start = time.perf_counter()
            result = Comparison(eager, compiled, x, amp=True)
            print(f'{size} (AMP fp16, {time.perf_counter() - start:.0f} s): {result}')
            assert result.ok(), result
            continue
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            outs = model(x)
            sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append(([o.detach() for o in outs], grads, time.perf_counter() - start))
        (outs_e, grads_e, _), (outs_c, grads_c, seconds) = results
        out_err = max(((c - e).norm() / e.norm()).item() for c, e in zip(outs_c, outs_e))
        errors = {n: ((grads_c[n] - g).norm() / g.norm()).item() for n, g in grads_e.items() if g.norm() > 0}
        worst = sorted(errors, key=errors.get, reverse=True)[:args.worst]
        print(f'{size}: outputs {out_err:.2e}, worst gradient {errors[worst[0]]:.2e} (compiled step {seconds:.0f} s)')
        for name in worst:
            g = grads_e[name]
            print(f'    {name}: {errors[name]:.1e} (norm {g.norm():.1e}, largest {g.abs().max():.1e})')
    graphs = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(GroupMamba._forward.__code__))
    print(f'graphs compiled: {graphs}')


if __name__ == '__main__':
    main()

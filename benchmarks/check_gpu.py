"""GPU correctness of GroupMamba with the Triton kernels, before any timing.

    python benchmarks/check_gpu.py [--amp-steps 1000] [--bf16-steps 300]

1. The golden official outputs (``../shared/golden`` or ``--golden``), fp32 on the GPU (TF32 off): <= 1e-4.
2. GroupMamba-T on the GPU, Triton path against the PyTorch reference path (``MMGM_SCAN_IMPL=reference``):
   outputs and every parameter gradient, fp32.
3. ``--amp-steps`` random AMP fp16 (and ``--bf16-steps`` bf16) forward/backward steps at the detection size
   (bs 2, 800x1344), with random weights re-drawn every 100 steps: the loss and every gradient must stay
   finite.
"""
import argparse
import os
from pathlib import Path

import torch

from mmgroupmamba import GroupMamba


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_golden(path):
    golden = torch.load(path, weights_only=True)
    model = GroupMamba(arch=golden['arch_cfg']).cuda().eval()
    model.load_state_dict(golden['state_dict'], strict=False)
    with torch.no_grad():
        outs = model(golden['input'].cuda())
    errors = [rel_err(o.cpu(), e) for o, e in zip(outs, golden['stage_outputs'])]
    print('golden stage rel errors (GPU, Triton):', ['%.2e' % e for e in errors])
    assert max(errors) <= 1e-4


def run_with(impl, model, x):
    os.environ['MMGM_SCAN_IMPL'] = impl
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [o.detach() for o in outs], grads


def check_against_reference():
    torch.manual_seed(0)
    model = GroupMamba(arch='tiny').cuda().train()
    x = torch.randn(2, 3, 160, 224, device='cuda')
    outs_t, grads_t = run_with('triton', model, x)
    outs_r, grads_r = run_with('reference', model, x)
    os.environ.pop('MMGM_SCAN_IMPL')
    out_err = max(rel_err(a, b) for a, b in zip(outs_t, outs_r))
    grad_errs = {n: rel_err(grads_t[n], grads_r[n]) for n in grads_r if grads_r[n].norm() > 0}
    worst = max(grad_errs, key=grad_errs.get)
    print(f'T, Triton vs reference (fp32): outputs {out_err:.2e}, worst gradient {worst} {grad_errs[worst]:.2e}')
    assert out_err <= 1e-4 and grad_errs[worst] <= 1e-3


def check_amp_steps(steps, dtype, interval=100):
    model = GroupMamba(arch='tiny', drop_path_rate=0.2).cuda().train()
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
            grads = [p.grad for p in params if p.grad is not None]
            finite &= torch.isfinite(loss) & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        assert finite.item(), f'a loss or gradient was not finite in steps {start}..{start + interval - 1}'
    print(f'{steps} AMP {dtype} steps at bs 2, 800x1344: loss and gradients finite')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--golden', default=str(Path(__file__).resolve().parents[1].parent / 'shared' / 'golden'
                                                / 'golden_mini_seed0.pt'))
    parser.add_argument('--amp-steps', type=int, default=0)
    parser.add_argument('--bf16-steps', type=int, default=0)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for the comparisons
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name())
    check_golden(args.golden)
    check_against_reference()
    torch.backends.cudnn.allow_tf32 = True
    for steps, dtype in ((args.amp_steps, torch.float16), (args.bf16_steps, torch.bfloat16)):
        if steps:
            check_amp_steps(steps, dtype)


if __name__ == '__main__':
    main()

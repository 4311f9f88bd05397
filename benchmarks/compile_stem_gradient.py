"""CPU: why one input's compiled stem gradients are 3.4e-3 off eager's (twelfth session,
``compile_sizes_check.py``'s first version), while its outputs agree within 2e-6.

    python benchmarks/compile_stem_gradient.py

Rebuilds that case: the mini backbone from seed 0, a second model built (it consumed the random numbers the
first version consumed), then the inputs 2x64x64, 1x96x64 and 2x80x112, of which the last is the case. The
stem's upstream gradient is taken from an eager step of the whole backbone. Then the stem alone (its conv /
BatchNorm / ReLU stack, plain PyTorch modules) runs eagerly in float64 and float32 and through torch.compile
(Inductor's C++ backend), and the script prints:

* each one's worst parameter-gradient error against float64;
* the ReLU outputs whose sign differs between the eager and the compiled forward (a pre-activation within
  rounding of zero), with the value and the upstream gradient there;
* eager's gradients with those elements' upstream gradient set to zero, against the compiled ones.

If the last line is small, the compiled gradients are right for a forward that rounded that element to the
other side of the ReLU's kink: fp32 rounding, not a wrong kernel.
"""
import copy

import torch

from mmgroupmamba import GroupMamba


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stem_gradients(stem, images, upstream, compiled=False, dtype=torch.float32):
    stem = copy.deepcopy(stem).to(dtype)
    run = torch.compile(stem, fullgraph=True, dynamic=False) if compiled else stem
    run(images.to(dtype)).backward(upstream.to(dtype))
    return {n: p.grad for n, p in stem.named_parameters()}


def main():
    torch.manual_seed(0)
    backbone = GroupMamba(arch='mini').train()
    GroupMamba(arch='mini')
    images = [torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 64), torch.randn(2, 3, 80, 112)][2]
    stem = copy.deepcopy(backbone.patch_embed1.conv)  # before the step: the BatchNorms' running stats as built
    seen = {}

    def keep_upstream(module, args, out):
        out.register_hook(lambda grad: seen.setdefault('upstream', grad.clone()))

    backbone.patch_embed1.conv.register_forward_hook(keep_upstream)
    outs = backbone(images)
    sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
    upstream = seen['upstream']

    exact = stem_gradients(stem, images, upstream, dtype=torch.float64)
    eager = stem_gradients(stem, images, upstream)
    compiled = stem_gradients(stem, images, upstream, compiled=True)
    for name, grads in (('eager fp32', eager), ('compiled fp32', compiled)):
        worst = max(exact, key=lambda n: relative(grads[n], exact[n]))
        print(f'{name} against float64: worst {worst} {relative(grads[worst], exact[worst]):.2e}')

    with torch.no_grad():
        eager_out = copy.deepcopy(stem)(images)
        compiled_out = torch.compile(copy.deepcopy(stem), fullgraph=True, dynamic=False)(images)
    flipped = (eager_out > 0) != (compiled_out > 0)
    print(f'ReLU outputs of opposite sign: {int(flipped.sum())} of {flipped.numel()}; eager '
          f'{eager_out[flipped].tolist()}, compiled {compiled_out[flipped].tolist()}, upstream gradient there '
          f'{upstream[flipped].tolist()}')
    masked = stem_gradients(stem, images, upstream.masked_fill(flipped, 0))
    worst = max(masked, key=lambda n: relative(compiled[n], masked[n]))
    print(f'compiled against eager without those elements: worst {worst} '
          f'{relative(compiled[worst], masked[worst]):.2e}')


if __name__ == '__main__':
    main()

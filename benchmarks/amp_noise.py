"""How far AMP fp16's rounding alone moves a backbone's gradients: eager AMP against eager fp32, on one input and on
perturbed copies of it (the draws ``gradient_check.Comparison`` samples for its AMP bound).

    python benchmarks/amp_noise.py [--arch tiny] [--size 2 192 160] [--draws 3] [--match 'skip_scale$'] [--device cpu]

The AMP compile check (``check_gpu.py --only compile-amp``) judges a compiled AMP gradient by its distance from
eager fp32 next to eager AMP's. For gradients summed over a whole map with much cancellation (``skip_scale``),
eager AMP's own distance changes by up to an order of magnitude between an input and the same input moved by fp16's last
place, so one draw of it is no bound. This prints, for each parameter whose name matches ``--match``, eager
AMP's relative error against eager fp32 on an input and on each of ``--draws`` perturbed copies
(``gradient_check.perturbed_inputs``), each copy against its own fp32 gradients, then the largest. The model is
``check_gpu.py``'s (the same seed); the input is a draw of the size given, not that check's own (it draws one
per size in turn). On the CPU the fused ops run their PyTorch reference (fp16 autocast on the CPU's matmuls); the
roundings are not the GPU's, their scale is.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_check import amp_errors, perturbed_inputs  # noqa: E402


def errors_over_draws(model, images, names, draws):
    """``{name: [error on images, error on each perturbed copy]}``: eager AMP against eager fp32."""
    per_draw = [amp_errors(model, draw, names) for draw in [images] + perturbed_inputs(images, draws)]
    return {name: [errors[name] for errors in per_draw] for name in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, nargs=3, default=[2, 192, 160], metavar=('BATCH', 'HEIGHT', 'WIDTH'))
    parser.add_argument('--draws', type=int, default=3, help='perturbed copies of the input besides the input')
    parser.add_argument('--match', default=r'skip_scale$', help='regular expression the parameter names must match')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    from mmgroupmamba import GroupMamba

    torch.manual_seed(0)  # the model of check_gpu.py's compile checks (built on the CPU, then moved)
    model = GroupMamba(arch=args.arch).to(args.device).train()
    names = [name for name, _ in model.named_parameters() if re.search(args.match, name)]
    if not names:
        parser.error(f'--match {args.match!r} matches no parameter of GroupMamba {args.arch!r}')
    images = torch.randn(*args.size[:1], 3, *args.size[1:], device=args.device)
    start = time.perf_counter()
    errors = errors_over_draws(model, images, names, args.draws)
    batch, height, width = args.size
    print(f'GroupMamba {args.arch}, {batch}x{height}x{width}, {args.device}: eager AMP fp16 against eager fp32, '
          f'relative error of each gradient on the input and {args.draws} perturbed copies '
          f'({time.perf_counter() - start:.0f} s)')
    print('| parameter | input | ' + ' | '.join(f'copy {i + 1}' for i in range(args.draws)) + ' | largest | x input |')
    print('| --- ' * (args.draws + 4) + '|')
    for name, errs in errors.items():
        ratio = max(errs) / errs[0] if errs[0] > 0 else float('inf')
        print(f'| {name} | ' + ' | '.join(f'{e:.1e}' for e in errs) + f' | {max(errs):.1e} | {ratio:.1f} |')
    return errors


if __name__ == '__main__':
    main()

"""GPU: does a torch.profiler trace slow the launches that come after it in the process?

    python benchmarks/profiler_tax.py [--models T] [--steps 10]

Times the eager detection-size step (bs 2, 800x1344, forward + backward under AMP) of Swin and GroupMamba of each
size, then traces one step of each with torch.profiler (CPU and CUDA activity, as ``backbone_speed.py`` counts
launches), then times them all again, in one process. Eager rows are host-bound (one to two thousand launches a
step), so a cost per launch left behind by the trace (CUPTI staying attached, pytorch/pytorch#144455) shows
in full. ``backbone_speed.py`` times every row before counting any row's launches because of this.
"""
import argparse

import torch

from backbone_speed import build_backbones, detection_launches, detection_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['T'], choices=('T', 'S', 'B'))
    parser.add_argument('--steps', type=int, default=10)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    backbones = build_backbones(args.models, [''], 0.2)
    before = {name: detection_step(backbone, args.steps) for name, (backbone, _) in backbones.items()}
    launches = {name: detection_launches(backbone) for name, (backbone, _) in backbones.items()}
    after = {name: detection_step(backbone, args.steps) for name, (backbone, _) in backbones.items()}
    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}, eager det step (bs 2, 800x1344), '
          f'{args.steps} steps')
    print('| model | launches | ms before any trace | ms after the traces | after / before | us per launch added |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for name in backbones:
        added = (after[name] - before[name]) * 1000 / launches[name]
        print(f'| {name} | {launches[name]} | {before[name]:.1f} | {after[name]:.1f} | '
              f'{after[name] / before[name]:.2f} | {added:.1f} |')


if __name__ == '__main__':
    main()

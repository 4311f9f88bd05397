"""CPU inference latency of GroupMamba T/S/B (reference scan path) beside torchvision baselines, same run.

    python benchmarks/cpu_forward.py [--size 224] [--repeats 5] [--threads N]
"""
import argparse
import statistics
import time

import torch
import torchvision

from mmgroupmamba import GroupMamba


def median_seconds(model, x, repeats):
    with torch.no_grad():
        model(x)  # warm-up: allocator, oneDNN primitive caches
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.size, args.size)
    models = {f'GroupMamba-{a[0].upper()}': GroupMamba(arch=a) for a in ('tiny', 'small', 'base')}
    models['torchvision ResNet-50'] = torchvision.models.resnet50()
    models['torchvision Swin-T'] = torchvision.models.swin_t()
    results = {}
    for name, model in models.items():
        results[name] = median_seconds(model.eval(), x, args.repeats)
    base = results['torchvision Swin-T']
    print(f'\nCPU forward, batch 1, {args.size}x{args.size}, fp32, {torch.get_num_threads()} threads, '
          f'median of {args.repeats}')
    print('| model | seconds | vs Swin-T |\n| --- | --- | --- |')
    for name, seconds in results.items():
        print(f'| {name} | {seconds:.3f} | {seconds / base:.2f}x |')


if __name__ == '__main__':
    main()

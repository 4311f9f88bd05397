"""Where a GroupMamba training step spends its GPU time: torch.profiler table of the top CUDA ops.

    python benchmarks/profile_step.py [--arch tiny] [--batch 128] [--rows 30]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mmgroupmamba import GroupMamba


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224))
    parser.add_argument('--rows', type=int, default=30)
    args = parser.parse_args()
    model = GroupMamba(arch=args.arch, out_indices=(3,)).cuda().train()
    x = torch.randn(args.batch, 3, *args.size, device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.float16):
            loss = model(x)[0].float().pow(2).mean()
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=args.rows, max_name_column_width=60))


if __name__ == '__main__':
    main()

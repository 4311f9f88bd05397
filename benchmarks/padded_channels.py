"""GPU: GroupMamba with stage 3 stored padded (348 channels as 352, ``kernels/layout.py``) against the same model
unpadded (``channel_multiple=1``), in one process, eager training steps taken in turns.

    python benchmarks/padded_channels.py [--model T] [--batch 128] [--rounds 3] [--steps 5] [--profile-rows 25]

Per round and model: wall ms per AMP training step (bs ``--batch`` at 224x224, fused AdamW) and the host's
time up to its last launch with the GPU idle at the start (a step whose host time is above its wall time's
GPU share is bound by its host). Then one eager step of each under cProfile, by own time: where a difference in
host time comes from.
"""
import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from backbone_speed import NAMES
from mmgroupmamba import GroupMamba


def train_step(model, head, images, labels, optimizer, scaler):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16):
            logits = head(model(images)[-1].mean((2, 3)))
            loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=sorted(NAMES), default='T')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--profile-rows', type=int, default=25)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    images = torch.randn(args.batch, 3, 224, 224, device='cuda')
    labels = torch.randint(0, 1000, (args.batch,), device='cuda')
    steps = {}
    torch.manual_seed(0)
    for name, multiple in (('padded', 8), ('unpadded', 1)):
        model = GroupMamba(NAMES[args.model], drop_path_rate=0.1, channel_multiple=multiple).cuda().train()
        head = torch.nn.Linear(model.embed_dims[-1], 1000).cuda()
        params = list(model.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=True)
        steps[name] = train_step(model, head, images, labels, optimizer, torch.amp.GradScaler('cuda'))
        for _ in range(3):
            steps[name]()
    torch.cuda.synchronize()
    print(f'{torch.cuda.get_device_name()}, GroupMamba-{args.model}, batch {args.batch}, eager AMP fp16 training')
    print('| round | model | wall ms/step | host ms/step |')
    print('| --- | --- | --- | --- |')
    for round_ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps * 1000
            start = time.perf_counter()
            step()
            host = (time.perf_counter() - start) * 1000
            torch.cuda.synchronize()
            print(f'| {round_} | {name} | {wall:.1f} | {host:.1f} |', flush=True)
    for name, step in steps.items():
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(args.profile_rows)
        print(f'\n{name}: one eager step under cProfile, by own time')
        print('\n'.join(line[:160] for line in out.getvalue().splitlines()[4:]))


if __name__ == '__main__':
    main()

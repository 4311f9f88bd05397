"""Where a training step's reserved-but-unused GPU memory comes from: the allocations that made the caching
allocator reserve new segments in a steady-state step (GPU only).

    python benchmarks/memory_segments.py [--models T] [--batch 128] [--cuda-graph] [--compile]

``backbone_speed.py`` measured (H100, 2026-11-27) GroupMamba-T eager at 9.0 GiB allocated but 11.1 GiB
reserved, where Swin-T reserves 0.4 GiB above what it allocates; a graphed backbone's pool reserves about
what the eager step does. Reserved memory beyond the allocated peak is fragmentation: a free block too small
for a later allocation, so the allocator asks the driver for a new segment.

For each model (the same classifiers and AMP AdamW step as ``backbone_speed.py``): warm-up steps, the cache
emptied, then one step recorded with ``torch.cuda.memory._record_memory_history``. The table lists every
segment that step reserved, largest first, with its size, the allocation that needed it, how much was free in
the segments already reserved at that moment (as much as the request or more: fragmentation), and where in
Python that allocation was made (the innermost two frames in this project, mmdet or mmcv). A graphed backbone
reserves its pool while recording, so its first two steps are recorded instead.
"""
import argparse
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from backbone_speed import MODES, Classifier, allocator_setting, build_backbones
from mmgroupmamba.models.cuda_graph import CudaGraphs

OWN_CODE = ('mmgroupmamba', 'kernels', 'mmdet', 'mmcv', 'benchmarks')


def where(frames):
    """The innermost two frames of our code (or of OpenMMLab's) in an allocation's Python stack."""
    ours = [f for f in frames if any(part in Path(f['filename']).parts for part in OWN_CODE)]
    return ' <- '.join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:2]) or '?'


def recorded_segments(model, batch):
    model = model.cuda().train()
    images = torch.randn(batch, 3, 224, 224, device='cuda')
    labels = torch.randint(0, 1000, (batch,), device='cuda')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler('cuda')

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16):
            loss = F.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    # Eager: warm-up steps, then the cache emptied, so that the recorded step reserves its segments afresh. A
    # graphed backbone reserves its pool while recording its graphs, in the first step: record from there.
    graphed = any(isinstance(getattr(m, attr, None), CudaGraphs) for m in model.modules()
                  for attr in ('graphs', '_cuda_graphs'))
    for _ in range(0 if graphed else 5):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks='python')
    for _ in range(2 if graphed else 1):
        train_step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    model.cpu()
    return allocated, reserved, new_segments(snapshot['device_traces'][torch.cuda.current_device()])


def new_segments(events):
    """(segment size, size of the allocation that asked for it, bytes free in already reserved segments at that
    moment, where the allocation was made) for every segment reserved in ``events``. Free bytes at least the
    request's size mean that the request found no free block large enough: fragmentation."""
    segments, in_use, reserved = [], 0, 0
    for i, event in enumerate(events):
        action, size = event['action'], event['size']
        if action == 'segment_alloc':
            # The allocation that asked for the segment is the next one recorded.
            request = next((e for e in events[i + 1:] if e['action'] == 'alloc'), event)
            segments.append((size, request['size'], reserved - in_use, where(request.get('frames', []))))
            reserved += size
        elif action == 'segment_free':
            reserved -= size
        elif action == 'alloc':
            in_use += size
        elif action == 'free_completed':
            in_use -= size
    return segments


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['T'], choices=['T', 'S', 'B'])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--cuda-graph', action='store_true', help='also the graphed backbones')
    parser.add_argument('--compile', action='store_true',
                        help='also the compiled backbones (static sizes, as backbone_speed.py --compile-options '
                        '\'{"dynamic": false}\' compiles them)')
    parser.add_argument('--top', type=int, default=25)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    modes = [mode for mode, on in zip(MODES, (True, args.cuda_graph, args.compile)) if on]
    for name, (backbone, channels) in build_backbones(args.models, modes, 0.1, {'dynamic': False}).items():
        allocated, reserved, segments = recorded_segments(Classifier(backbone, channels), args.batch)
        fragmented = [s for s in segments if s[2] >= s[1]]
        print(f'\n{name}: peak allocated {allocated / 2**30:.2f} GiB, reserved {reserved / 2**30:.2f} GiB; '
              f'{len(segments)} segments reserved in the recorded steps, {sum(s[0] for s in segments) / 2**30:.2f} '
              f'GiB, of which {sum(s[0] for s in fragmented) / 2**30:.2f} GiB while enough was free (fragmentation)')
        print('| segment MiB | request MiB | free in reserved MiB | allocated at |')
        print('| --- | --- | --- | --- |')
        for size, request, free, place in sorted(segments, reverse=True)[:args.top]:
            print(f'| {size / 2**20:.1f} | {request / 2**20:.1f} | {free / 2**20:.1f} | {place} |')
        for label, chosen in (('fragmentation segments', fragmented), ('segments', segments)):
            by_place = Counter()
            for size, _, _, place in chosen:
                by_place[place] += size
            print(f'{label} by place (MiB): ' + '; '.join(f'{p}: {s / 2**20:.0f}' for p, s in by_place.most_common(8)))
        torch.cuda.empty_cache()
    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, AMP fp16, '
          f'{allocator_setting()}')


if __name__ == '__main__':
    main()

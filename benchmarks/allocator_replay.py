"""GPU memory fragmentation, estimated on the CPU: one training step's allocations replayed through a model of
PyTorch's CUDA caching allocator.

    python benchmarks/allocator_replay.py [--batch 8] [--steps 6] [--late 8]

On the GPU (H100, bs 128, 2026-11-27) GroupMamba-T allocated 9.0 GiB at its peak but reserved 11.1 GiB, where
Swin-T reserved 0.4 GiB above its 9.4 GiB. Reserved memory beyond the allocated peak is fragmentation: no free
block large enough for a request, so a new segment is reserved. To try changes against that without a GPU:

1. One AMP training step (bf16 autocast, the classifiers of ``backbone_speed.py``) runs on the CPU through the
   GPU code path (``MMGM_KERNELS=triton``), with every Triton launch skipped: the values are garbage, but
   the tensors allocated and freed, their sizes and their order are those of the GPU step. The profiler's
   memory timeline records them.
2. That sequence is replayed for ``--steps`` steps through :class:`CachingAllocatorModel`, which follows the
   rules of ``c10/cuda/CUDACachingAllocator.cpp`` (defaults: no ``max_split_size``, no expandable segments):
   sizes rounded to 512 bytes; requests up to 1 MiB from 2 MiB segments, up to 10 MiB from 20 MiB segments,
   larger ones from segments rounded to 2 MiB; best fit over free blocks; a block split when more than 1 MiB
   (512 bytes for small blocks) would remain; neighbours merged when freed. The cache is emptied before the
   last step, as ``backbone_speed.py`` does, and that step's peaks are printed.
3. ``--late``: the last step's latest new segments, with the request that caused each and how much was free
   in reserved segments at that moment: when that was at least the request, fragmentation caused it.

Cross-check: at bs 8 the model gives GroupMamba-T 0.67 GiB allocated / 0.84 reserved (gap 25%) and Swin-T
0.66 / 0.70 (6%), at commit 77c3a07; the GPU's gaps at bs 128 were 23% and 4%. At 919875a (the FFN backward
reusing its hidden-gradient buffer) GroupMamba-T is at 0.67 / 0.81. Known differences: CPU kernels
that allocate copies CUDA ones do not (``sum(dtype=torch.float32)`` of a bf16 tensor copies it to fp32 on the
CPU), and cuDNN/cuBLAS workspaces, which the CPU does not have.
"""
import argparse
import bisect
import os

MIB = 2**20
SMALL_REQUEST, SMALL_SEGMENT = 1 * MIB, 2 * MIB
MID_REQUEST, MID_SEGMENT = 10 * MIB, 20 * MIB
LARGE_ROUNDING = 2 * MIB


class Block:
    __slots__ = ('address', 'size', 'free', 'prev', 'next', 'small', 'segment')

    def __init__(self, address, size, small, segment, prev=None, next_=None):
        self.address, self.size, self.small, self.segment = address, size, small, segment
        self.free, self.prev, self.next = True, prev, next_


class CachingAllocatorModel:
    """Reserved and allocated bytes of the CUDA caching allocator for a sequence of mallocs and frees."""

    def __init__(self):
        self.free_blocks = {True: [], False: []}  # small pool? -> sorted [(size, address, block)]
        self.segments = {}  # id -> size
        self.reserved = self.allocated = self.peak_allocated = self.peak_reserved = 0
        self.next_address = 0

    def _add_free(self, block):
        bisect.insort(self.free_blocks[block.small], (block.size, block.address, block))

    def _remove_free(self, block):
        blocks = self.free_blocks[block.small]
        blocks.pop(bisect.bisect_left(blocks, (block.size, block.address)))

    def malloc(self, nbytes):
        size = 512 * max(1, -(-nbytes // 512))
        small = size <= SMALL_REQUEST
        blocks = self.free_blocks[small]
        index = bisect.bisect_left(blocks, (size, -1))
        if index < len(blocks):
            block = blocks.pop(index)[2]
        else:
            segment_size = (SMALL_SEGMENT if small else MID_SEGMENT if size < MID_REQUEST
                            else LARGE_ROUNDING * -(-size // LARGE_ROUNDING))
            block = Block(self.next_address, segment_size, small, len(self.segments))
            self.segments[block.segment] = segment_size
            self.next_address += segment_size
            self.reserved += segment_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if remaining >= 512 if small else remaining > SMALL_REQUEST:
            rest = Block(block.address + size, remaining, small, block.segment, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._add_free(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def release(self, block):
        block.free = True
        self.allocated -= block.size
        following, previous = block.next, block.prev
        if following is not None and following.free:
            self._remove_free(following)
            self._absorb(block, following)
        if previous is not None and previous.free:
            self._remove_free(previous)
            self._absorb(previous, block)
            block = previous
        self._add_free(block)

    @staticmethod
    def _absorb(block, following):
        """Merge ``following``, the block right after ``block`` in its segment, into ``block``."""
        block.size += following.size
        block.next = following.next
        if following.next is not None:
            following.next.prev = block

    def empty_cache(self):
        for segment, size in list(self.segments.items()):
            whole = [entry[2] for pool in self.free_blocks.values() for entry in pool
                     if entry[2].segment == segment and entry[2].size == size]
            if whole:
                self._remove_free(whole[0])
                del self.segments[segment]
                self.reserved -= size
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated


def skip_triton_launches():
    """Every Triton kernel launch becomes a no-op (tensors are still allocated by the Python code around it)."""
    from triton.runtime import interpreter, jit

    def launcher(self, grid):
        return lambda *args, **kwargs: None

    interpreter.InterpretedFunction.__getitem__ = launcher
    jit.KernelInterface.__getitem__ = launcher


def allocation_trace(model, batch):
    """[(action, key, bytes)] of one training step (after one untraced step), action CREATE, DESTROY or
    PREEXISTING, in order."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (batch,))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    return [(action.name, key, nbytes) for _, action, (key, _), nbytes in prof._memory_profile().timeline
            if action.name in ('CREATE', 'DESTROY', 'PREEXISTING')]


def replay(trace, steps):
    """Peak allocated and reserved bytes of the last of ``steps`` replayed steps, and the segments it reserved:
    [(segment bytes, request bytes, bytes free in reserved segments then)]."""
    allocator = CachingAllocatorModel()
    live = {key: allocator.malloc(nbytes) for action, key, nbytes in trace if action == 'PREEXISTING'}
    body = [event for event in trace if event[0] != 'PREEXISTING']
    # Tensors the step creates and keeps (parameter gradients) go at the next step's zero_grad.
    kept = {key for action, key, _ in body if action == 'CREATE'} - {key for action, key, _ in body
                                                                    if action == 'DESTROY'}
    new_segments = []
    for step in range(steps):
        for key in kept & live.keys():
            allocator.release(live.pop(key))
        last = step == steps - 1
        if last:
            allocator.empty_cache()
        for action, key, nbytes in body:
            if action == 'CREATE':
                if key in live:  # created again in a later step: the earlier tensor is gone by now
                    allocator.release(live.pop(key))
                reserved, free = allocator.reserved, allocator.reserved - allocator.allocated
                live[key] = allocator.malloc(nbytes)
                if last and allocator.reserved > reserved:
                    new_segments.append((allocator.reserved - reserved, nbytes, free))
            elif key in live:
                allocator.release(live.pop(key))
    return allocator.peak_allocated, allocator.peak_reserved, new_segments


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--late', type=int, default=8, help='print the last step\'s latest new segments')
    args = parser.parse_args()
    # The GPU code path on the CPU: Triton's interpreter accepts CPU tensors; its launches are skipped.
    os.environ['TRITON_INTERPRET'] = '1'
    os.environ['MMGM_KERNELS'] = 'triton'
    skip_triton_launches()
    import torch

    from backbone_speed import Classifier, build_backbones
    torch.manual_seed(0)
    print(f'one training step at bs {args.batch}, 224x224, bf16 autocast, replayed {args.steps} times\n')
    print('| model | peak allocated GiB | peak reserved GiB | reserved / allocated |')
    print('| --- | --- | --- | --- |')
    late = {}
    for name, (backbone, channels) in build_backbones(['T'], [''], drop_path_rate=0.1).items():
        allocated, reserved, segments = replay(allocation_trace(Classifier(backbone, channels).train(),
                                                                args.batch), args.steps)
        print(f'| {name} | {allocated / 2**30:.3f} | {reserved / 2**30:.3f} | {reserved / allocated:.2f} |')
        late[name] = segments[len(segments) - args.late:]
    for name, segments in late.items():
        print(f'\n{name}, latest new segments of the last step (fragmentation: free >= request):')
        for segment, request, free in segments:
            print(f'  segment {segment / MIB:6.1f} MiB for a {request / MIB:6.1f} MiB request, {free / MIB:7.1f} MiB '
                  f'free{"  <- fragmentation" if free >= request else ""}')


if __name__ == '__main__':
    main()

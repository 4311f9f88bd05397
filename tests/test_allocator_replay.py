"""The caching-allocator model of ``benchmarks/allocator_replay.py``: the CUDA allocator's rules that decide
how much is reserved (segment sizes, best fit, splitting, merging, emptying the cache)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from allocator_replay import MIB, CachingAllocatorModel, replay  # noqa: E402


def test_segment_sizes_follow_the_request_size():
    allocator = CachingAllocatorModel()
    allocator.malloc(100)  # small pool: a 2 MiB segment, the request rounded to 512 bytes
    assert (allocator.reserved, allocator.allocated) == (2 * MIB, 512)
    allocator.malloc(3 * MIB)  # under 10 MiB: a 20 MiB segment
    assert allocator.reserved == 22 * MIB
    allocator.malloc(25 * MIB + 1)  # larger: its own segment, rounded up to 2 MiB
    assert allocator.reserved == 22 * MIB + 26 * MIB


def test_best_fit_split_and_merge():
    allocator = CachingAllocatorModel()
    first = allocator.malloc(4 * MIB)  # carves a 20 MiB segment: 16 MiB stay free
    second = allocator.malloc(6 * MIB)  # fits in the rest of it
    assert allocator.reserved == 20 * MIB
    allocator.release(first)
    allocator.release(second)  # merges with both neighbours: the segment is one free block again
    big = allocator.malloc(18 * MIB)  # split: more than 1 MiB remains
    assert allocator.reserved == 20 * MIB and big.size == 18 * MIB
    allocator.release(big)
    whole = allocator.malloc(19 * MIB)  # not split: only 1 MiB would remain
    assert allocator.reserved == 20 * MIB and whole.size == 20 * MIB


def test_fragmentation_reserves_a_new_segment():
    allocator = CachingAllocatorModel()
    blocks = [allocator.malloc(5 * MIB) for _ in range(4)]  # one 20 MiB segment, full
    allocator.release(blocks[0])
    allocator.release(blocks[2])  # 10 MiB free, in two separate 5 MiB holes
    allocator.malloc(8 * MIB)
    assert allocator.reserved == 40 * MIB


def test_replay_frees_kept_tensors_at_the_next_step_and_empties_the_cache():
    trace = [('PREEXISTING', 'weight', 4 * MIB), ('CREATE', 'activation', 30 * MIB),
             ('CREATE', 'grad', 4 * MIB), ('DESTROY', 'activation', 30 * MIB)]
    allocated, reserved, segments = replay(trace, steps=3)
    # The grad of the step before is freed at the step's start (zero_grad), so it fits beside the weight in
    # the first 20 MiB segment. Emptying the cache before the last step gives back the activation's segment,
    # which that step reserves again, with 16 MiB free: too little, so no fragmentation.
    assert allocated == 38 * MIB and reserved == 50 * MIB
    assert segments == [(30 * MIB, 30 * MIB, 16 * MIB)]

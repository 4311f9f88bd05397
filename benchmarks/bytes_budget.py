"""Bytes each kernel of a GroupMambaBlock's training step reads and writes per image, against the minimum, on the
CPU (issue #15: the H200 step is bound by bytes moved; this budget says which passes to cut).

    python benchmarks/bytes_budget.py [--stages 1 2 3 4] [--size-scale 1] [--sms 132] [--fp32] [--run-kernels]
                                      [--measured KERNEL=MS ...] [--batch 128] [--copy-tbps 4.272] [--inference]

For one block of each stage of GroupMamba-T (64/128/348/448 channels, MLP ratios 8/8/4/4, on the 56/28/14/7 maps
of a 224x224 image; batch 1, train mode, drop_path 0.1, bf16 autocast on the CPU standing in for CUDA fp16), the
forward and backward are walked as ``launch_count.py`` walks them (its :class:`LaunchWalker`: every ATen op that
launches a kernel, the fused ops' insides, the Triton path through the interpreter with tilings sized for
``--sms``), and every launch's bytes are summed by (phase, kernel). The Triton kernels themselves run only with
``--run-kernels`` (the interpreter took minutes for the first stage alone): what a launch reads and writes
depends on shapes only, and ``tests/test_bytes_budget.py`` checks that both walks give the same budget.

* read: the bytes of its input tensors; written: those of its outputs (see :class:`LaunchWalker` for which
  tensors those are). A tensor's bytes are those of the distinct elements it addresses: a broadcast
  (stride-0) dimension counts once, a channel slice of a wider tensor counts the slice;
* a :data:`~launch_count.TWO_KERNELS` op writes its output (the zero fill) and its input's bytes again (the copy).

Against it, the minimum for the block: its input read and its output written once (forward), the kept
activations written once in the forward and read once in the backward, the weights read once (forward) and
their gradients written once (backward), the output's gradient read and the input's gradient written once
(backward). The kept activations are the storages autograd saves (``saved_tensors_hooks``, each storage once,
whole), less the weights and the tensors computed from weights alone (their casts), which are listed apart; the
block's input, when saved, is read again in the backward but not written.

``--inference`` walks an eval forward without gradient instead (the block's second: the first builds the weights
later ones reuse), for the classification table's inference column, against the block's input read, its
weights read and its output written once. At batch 1 the weights' share is per step, as above: stage 4's
weights outweigh its 7x7 map, so read the later stages' ratios as batch 1's only.

``--measured`` takes the GPU time of our kernels in one training step of the whole backbone at ``--batch``
(profile_step.py's table, e.g. ``_dwconv_bwd_pre_kernel=9.931``) and prints each kernel's achieved bandwidth:
its bytes per image per block, times the batch and each stage's depth, summed over the stages, over the measured
time, against the card's copy bandwidth (``--copy-tbps``, read + write, as ``scan_kernels.py`` measures it).
The norms' times include the stem's, downsampling and stage norms, which the blocks' budget does not. With
``--measured``, the batch-1 walk sizes its tilings for ``sms / batch`` multiprocessors, so that each image is
tiled as in the measured batch (no sequence split at batch 128, full-length walks, their partial sums).

What is approximate:

* a kernel is taken to read every input whole and once: a kernel that reads part of an input (a scan's state
  checkpoints, one tile's halo) counts it all; one that reads an input several times (a matmul's operand re-read
  per output tile, a broadcast operand per row) counts it once, as though the cache held it; cuBLAS's split-K
  partial sums and the interpreter-free GPU's own copies are not seen;
* a Triton kernel's outputs are told apart only as the tensors its launcher allocated (``empty*``) and nothing
  wrote since; an argument that a kernel both reads and writes, or writes into after a zero fill, counts as
  read only;
* an in-place ATen op reads and writes its first argument, except :data:`~launch_count.OVERWRITES_SELF`;
* batch 1: the weights' traffic (their casts, reads and gradients) is per step, not per image; at batch B it
  is B times smaller per image, so the later stages' totals are dominated by what a real batch shares;
* the minimum reads the weights once in all, although the backward needs them (or their casts) again for the
  input gradient, and counts no optimizer step.
"""
import argparse
import collections
import datetime
import time

import torch

# launch_count sets TRITON_INTERPRET and MMGM_KERNELS before Triton's first import (torch does not import it).
from launch_count import TWO_KERNELS, LaunchWalker, size_tilings_for, storage_key, walk_inference, walk_step
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS, GroupMambaBlock

MB = 1e6
PHASES = ('forward', 'backward')
TINY_MAPS = (56, 28, 14, 7)  # the stages' maps of a 224x224 image (strides 4, 8, 16, 32)


def bytes_of(t):
    """Bytes of the distinct elements ``t`` addresses: a broadcast (stride-0) dimension counts once."""
    if t.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


class ByteBudget(LaunchWalker):
    """Launches, bytes read and bytes written by ``(phase, name)``; the storages autograd saves in ``kept``.

    ``params``: the module's parameters; a storage computed from them alone (a cast, a concatenation of casts)
    is marked as coming from weights, so that what autograd keeps of it is not counted as an activation.
    """

    def __init__(self, params=()):
        super().__init__()
        self.launches = collections.Counter()
        self.read = collections.Counter()
        self.written = collections.Counter()
        self.kept = {}  # storage key -> (bytes, whether it holds weights or what was computed from them alone)
        self._weight_keys = {storage_key(p) for p in params}

    def launch(self, name, reads, writes, kernels):
        key = self.phase, name
        read = sum(map(bytes_of, reads))
        self.launches[key] += kernels
        self.read[key] += read
        self.written[key] += sum(map(bytes_of, writes)) + (read if name in TWO_KERNELS else 0)
        # Unfilled memory read along (a concatenation's padding) holds nothing that is not the weights'.
        sources = [t for t in reads if not self.unwritten(t)]
        from_weights = bool(sources) and all(storage_key(t) in self._weight_keys for t in sources)
        for t in writes:  # an address reused for an activation stops being a weight's
            (self._weight_keys.add if from_weights else self._weight_keys.discard)(storage_key(t))

    def _keep(self, t):
        key = storage_key(t)
        if key not in self.kept:
            self.kept[key] = (t.untyped_storage().nbytes(), key in self._weight_keys)
        return t

    def saved_tensors(self):
        """Context in which what autograd saves is recorded in ``kept``."""
        return torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)

    def totals(self, phase=None):
        """Launches, bytes read and bytes written of ``phase`` (both phases: None)."""
        keys = [k for k in self.launches if phase in (None, k[0])]
        return tuple(sum(counter[k] for k in keys) for counter in (self.launches, self.read, self.written))


def minimum_items(budget, x, out, params):
    """The block's minimum bytes as ``[(phase, item, bytes)]`` (module docstring)."""
    boundary = {storage_key(x), storage_key(out)}  # written already as the block's input and output
    activations = {k: n for k, (n, from_weights) in budget.kept.items() if not from_weights}
    written = sum(n for k, n in activations.items() if k not in boundary)
    weights = sum(p.nbytes for p in params)
    return [
        ('forward', 'block input read', bytes_of(x)),
        ('forward', 'weights read', weights),
        ('forward', f'kept activations written ({len(activations)} storages, block input and output aside)', written),
        ('forward', 'block output written', bytes_of(out)),
        ('backward', "output's gradient read", bytes_of(out)),
        ('backward', 'kept activations read', sum(activations.values())),
        ('backward', 'weight gradients written', weights),
        ('backward', "input's gradient written", bytes_of(x)),
    ]


def budget_block(dims, mlp_ratio, size, autocast=True, run_kernels=False, inference=False):
    """Walks one training step of a GroupMambaBlock on a ``1 x size x size x dims`` map, the Triton kernels run
    or not; its :class:`ByteBudget` and minimum items. ``inference``: a later eval forward without gradient
    instead (the first builds the weights it reuses), against the block's input, weights and output once."""
    torch.manual_seed(0)
    block = GroupMambaBlock(dims, mlp_ratio, drop_path=0.1).train(not inference)
    params = list(block.parameters())
    x = torch.randn(1, size, size, dims, requires_grad=not inference)
    if inference:
        walk_inference(ByteBudget(params), block, x, autocast, run_kernels)
        budget = ByteBudget(params)
        out = walk_inference(budget, block, x, autocast, run_kernels)
        return budget, [('forward', 'block input read', bytes_of(x)),
                        ('forward', 'weights read', sum(p.nbytes for p in params)),
                        ('forward', 'block output written', bytes_of(out))]
    budget = ByteBudget(params)
    (out, ) = walk_step(budget, block, x, autocast, budget.saved_tensors(), run_kernels)
    return budget, minimum_items(budget, x, out, params)


def print_stage(budget, minimum):
    """The kernel table, the minimum against the total, the largest items."""
    print('| phase | kernel | launches | MB read | MB written | MB |')
    print('| --- | --- | --- | --- | --- | --- |')
    for phase in [phase for phase in PHASES if budget.totals(phase)[0]]:
        for key in sorted(k for k in budget.launches if k[0] == phase):
            read, written = budget.read[key], budget.written[key]
            print(f'| {phase} | {key[1]} | {budget.launches[key]} | {read / MB:.2f} | {written / MB:.2f} | '
                  f'{(read + written) / MB:.2f} |')
        launches, read, written = budget.totals(phase)
        print(f'| **{phase}** | **total** | **{launches}** | **{read / MB:.2f}** | **{written / MB:.2f}** | '
              f'**{(read + written) / MB:.2f}** |')
    launches, read, written = budget.totals()
    achieved = read + written
    print(f'| **both** | **total** | **{launches}** | **{read / MB:.2f}** | **{written / MB:.2f}** | '
          f'**{achieved / MB:.2f}** |\n')

    print('| phase | minimum | MB |\n| --- | --- | --- |')
    for phase, item, n in minimum:
        print(f'| {phase} | {item} | {n / MB:.2f} |')
    least = sum(n for _, _, n in minimum)
    print(f'| **both** | **minimum** | **{least / MB:.2f}** |\n')
    from_weights = sum(n for n, weight in budget.kept.values() if weight)
    print(f'achieved {achieved / MB:.2f} MB against the minimum {least / MB:.2f} MB: {achieved / least:.2f}x '
          f'(weights and their casts kept for the backward, not in the minimum: {from_weights / MB:.2f} MB)\n')

    print('largest (phase, kernel) by MB read + written:\n')
    moved = {k: budget.read[k] + budget.written[k] for k in budget.launches}
    for rank, (key, n) in enumerate(sorted(moved.items(), key=lambda item: -item[1])[:10], 1):
        print(f'{rank}. {key[0]} `{key[1]}`: {n / MB:.2f} MB ({100 * n / achieved:.0f}%), '
              f'{budget.launches[key]} launches')
    return achieved, least


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--stages', type=int, nargs='+', default=[1, 2, 3, 4], help='stages of GroupMamba-T')
    parser.add_argument('--size-scale', type=float, default=1.0, help="factor on the stages' map sizes")
    parser.add_argument('--sms', type=int, default=132, help='multiprocessors the tilings are sized for')
    parser.add_argument('--fp32', action='store_true', help='no autocast')
    parser.add_argument('--run-kernels', action='store_true', help='run the Triton kernels (interpreted: slow)')
    parser.add_argument('--inference', action='store_true',
                        help='the eval forward without gradient (a later one) instead of the training step')
    parser.add_argument('--measured', nargs='+', default=[], metavar='KERNEL=MS',
                        help="GPU ms of our kernels in one backbone training step at --batch (profile_step.py)")
    parser.add_argument('--batch', type=int, default=128, help='the batch of the --measured step')
    parser.add_argument('--copy-tbps', type=float, default=4.272, help="the card's copy bandwidth, TB/s")
    args = parser.parse_args()
    measured = parse_measured(args.measured)
    if measured and args.inference:
        raise SystemExit('--measured takes the times of a training step: leave out --inference')
    # The launchers choose tilings (sequence splits, walk lengths, partial sums per image) from their program
    # count, which grows with the batch, against the multiprocessors: a batch-1 walk sized for sms / batch of
    # them tiles each image as the measured batch does.
    sms = max(1, round(args.sms / args.batch)) if measured else args.sms
    size_tilings_for(sms)
    arch = ARCH_SETTINGS['tiny']
    precision = 'fp32' if args.fp32 else 'bf16 autocast'
    walked = 'a later eval forward, no gradient' if args.inference else 'forward + backward, train, drop_path 0.1'
    print(f'bytes per image of one GroupMambaBlock per stage of GroupMamba-T, {walked} ({precision}, '
          f'Triton path, tilings for {sms} SMs), {datetime.date.today()}; MB = 1e6 bytes\n')
    summary = []
    for stage in args.stages:
        dims, ratio = arch['embed_dims'][stage - 1], arch['mlp_ratios'][stage - 1]
        size = max(1, round(TINY_MAPS[stage - 1] * args.size_scale))
        print(f'## stage {stage}: {dims} channels, MLP ratio {ratio}, 1x{size}x{size}\n')
        start = time.perf_counter()
        budget, minimum = budget_block(dims, ratio, size, not args.fp32, args.run_kernels, args.inference)
        achieved, least = print_stage(budget, minimum)
        print(f'\n({time.perf_counter() - start:.1f} s on this CPU)\n')
        summary.append((stage, dims, size, budget, achieved, least))

    print('## all stages\n\n| stage | block | fwd MB | bwd MB | total MB | minimum MB | total / minimum |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for stage, dims, size, budget, achieved, least in summary:
        forward = sum(budget.totals('forward')[1:])
        print(f'| {stage} | {dims}x{size}x{size} | {forward / MB:.2f} | {(achieved - forward) / MB:.2f} | '
              f'{achieved / MB:.2f} | {least / MB:.2f} | {achieved / least:.2f}x |')
    if measured:
        print_bandwidth(summary, measured, args.batch, args.copy_tbps)


def parse_measured(items):
    """``['_scan_bwd_kernel=6.157', ...]`` -> ``{'_scan_bwd_kernel': 6.157}``, loud on a malformed item."""
    measured = {}
    for item in items:
        name, sep, ms = item.partition('=')
        try:
            measured[name] = float(ms)
        except ValueError:
            sep = ''
        if not sep or not name:
            raise SystemExit(f'--measured takes KERNEL=MS items (e.g. _scan_bwd_kernel=6.157), got {item!r}')
    return measured


def step_bytes(summary, batch):
    """Bytes each of our kernels moves in one training step of GroupMamba-T's blocks at ``batch``: per image per
    block, times the batch and the stage's depth, both phases, summed over the stages in ``summary``."""
    depths = ARCH_SETTINGS['tiny']['depths']
    moved = collections.Counter()
    for stage, _, _, budget, _, _ in summary:
        for key in budget.launches:
            if key[1].startswith('triton:'):
                moved[key[1][len('triton:'):]] += (budget.read[key] + budget.written[key]) * batch * depths[stage - 1]
    return moved


def print_bandwidth(summary, measured, batch, copy_tbps):
    moved = step_bytes(summary, batch)
    unknown = sorted(set(measured) - set(moved))
    if unknown:
        raise SystemExit(f'--measured names kernels the blocks do not launch: {unknown}; known: {sorted(moved)}')
    stages = ', '.join(str(entry[0]) for entry in summary)
    print(f'\n## achieved bandwidth at batch {batch} (blocks of stages {stages}; copy {copy_tbps} TB/s)\n')
    print('| kernel | GB moved per step | measured ms | GB/s | of copy bandwidth |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for name, ms in sorted(measured.items(), key=lambda item: -item[1]):
        rate = moved[name] / (ms * 1e-3)
        print(f'| {name} | {moved[name] / 1e9:.2f} | {ms:.3f} | {rate / 1e9:.0f} | {rate / (copy_tbps * 1e12):.0%} |')


if __name__ == '__main__':
    main()

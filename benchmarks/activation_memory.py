"""Bytes a training step keeps for backward, per image, split by where they are saved (runs on the CPU).

    python benchmarks/activation_memory.py [--size 224] [--batch 2]

Activation memory is most of a training step's peak. This counts every tensor autograd saves (each storage
once), under bf16 autocast as a stand-in for AMP, and attributes it to the innermost GroupMamba part running
when it was saved: the scan layer, the FFN, the norms and residuals of the blocks, the stem and downsampling.
mmdet's Swin-T (from its Mask R-CNN config) is counted the same way, as a whole, in the same run.

On the CPU the scan runs its PyTorch reference, which saves far more than the Triton kernels (decay matrices
of every chunk); for the GPU's numbers run the Triton kernels through the interpreter (slow):
``TRITON_INTERPRET=1 MMGM_KERNELS=triton python benchmarks/activation_memory.py --archs tiny --batch 1``.
"""
import argparse
from collections import defaultdict

import torch
from mmengine.hub import get_config

from mmgroupmamba import GroupMamba
from mmgroupmamba.models.groupmamba import ConvFFN, ConvStem, Downsample, GroupMambaBlock, GroupMambaLayer

PARTS = (GroupMambaLayer, ConvFFN, GroupMambaBlock, ConvStem, Downsample)


def saved_bytes(model, x, parts=()):
    """Bytes saved for backward by one forward of ``model`` on ``x``, by innermost part in ``parts``."""
    stack, seen, totals = ['other'], set(), defaultdict(int)

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            totals[stack[-1]] += key[1]
        return tensor

    handles = []
    for module in model.modules():
        if isinstance(module, parts):
            name = type(module).__name__
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
            handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = model(x)
    for handle in handles:
        handle.remove()
    del outs
    return dict(totals)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--archs', nargs='+', default=['tiny', 'small', 'base'], choices=['tiny', 'small', 'base'])
    args = parser.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size)
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    swin_cfg = get_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py').model.backbone
    swin_cfg.pop('init_cfg', None)
    with DefaultScope.overwrite_default_scope('mmdet'):
        swin = MODELS.build(swin_cfg)
    swin.train()
    swin_total = sum(saved_bytes(swin, x).values()) / args.batch
    mib = 2**20
    print(f'\nbytes saved for backward per image, {args.size}x{args.size}, bf16 autocast, all four stage outputs')
    print('| model | total MiB | x Swin-T | GroupMambaLayer | ConvFFN | block norms/residuals | stem+downsampling '
          '| other |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    print(f'| Swin-T (mmdet) | {swin_total / mib:.1f} | 1.00 | | | | | |')
    for arch in args.archs:
        parts = saved_bytes(GroupMamba(arch=arch).train(), x, PARTS)
        total = sum(parts.values()) / args.batch
        cells = [parts.get(k, 0) / args.batch / mib for k in ('GroupMambaLayer', 'ConvFFN', 'GroupMambaBlock')]
        stem = (parts.get('ConvStem', 0) + parts.get('Downsample', 0)) / args.batch / mib
        other = parts.get('other', 0) / args.batch / mib
        print(f'| GroupMamba-{arch[0].upper()} | {total / mib:.1f} | {total / swin_total:.2f} | '
              + ' | '.join(f'{c:.1f}' for c in cells) + f' | {stem:.1f} | {other:.1f} |')


if __name__ == '__main__':
    main()

"""GPU: how long torch.compile takes for the GroupMamba backbone (first training step, AMP fp16), static and
dynamic sizes, beside mmdet's Swin-T compiled the same way; then the same step at a second size (a recompile
shows as a second long step).

    python benchmarks/compile_time.py [--models GroupMamba-T Swin-T] [--dynamic 0 1] [--size 224 224]
"""
import argparse
import time

import torch
from mmengine.hub import get_config

import mmgroupmamba  # noqa: F401  (registers GroupMamba)
from mmgroupmamba.models.compiled import CompiledForward


def build(name, dynamic):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        if name == 'Swin-T':
            cfg = get_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py').model.backbone
            cfg.pop('init_cfg', None)
            backbone = MODELS.build(cfg)
            compiled = CompiledForward('Swin-T', dict(dynamic=dynamic, fullgraph=False))
            return backbone, lambda x: compiled(backbone.forward, x)
        backbone = MODELS.build(dict(type='GroupMamba', arch='tiny', compile=dict(dynamic=dynamic)))
        return backbone, backbone


def step_seconds(run, size, batch=2):
    x = torch.randn(batch, 3, *size, device='cuda')
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast('cuda', dtype=torch.float16):
        loss = sum(o.float().mean() for o in run(x))
    loss.backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['GroupMamba-T', 'Swin-T'])
    parser.add_argument('--dynamic', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--size', nargs=2, type=int, default=[224, 224])
    args = parser.parse_args()
    size = tuple(args.size)
    other = (size[0] + 32, size[1] - 32)
    print('| model | dynamic | first step s (compile) | second step s | step at a new size s |')
    print('| --- | --- | --- | --- | --- |')
    for dynamic in args.dynamic:
        for name in args.models:
            torch._dynamo.reset()
            backbone, run = build(name, bool(dynamic))
            backbone.cuda().train()
            first = step_seconds(run, size)
            second = step_seconds(run, size)
            new = step_seconds(run, other)
            print(f'| {name} | {bool(dynamic)} | {first:.1f} | {second:.3f} | {new:.1f} |', flush=True)


if __name__ == '__main__':
    main()

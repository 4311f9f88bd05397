"""How long torch.compile takes for the GroupMamba backbone (first training step, AMP), static and dynamic sizes,
beside mmdet's Swin-T compiled the same way; then the same step at a second size (a recompile shows as a second
long step).

    python benchmarks/compile_time.py [--models GroupMamba-T Swin-T] [--dynamic 0 1] [--size 224 224]
                                      [--device cuda] [--backend inductor]

On the GPU: fp16 autocast and Inductor. ``--device cpu`` runs bf16 autocast on the CPU, where ``--backend
aot_eager`` times what Dynamo and AOTAutograd take without Inductor's code generation (a row that never prints
under ``timeout`` is a trace that did not finish: thirty-fourth session, Swin-T with dynamic sizes).
"""
import argparse
import time

import torch
from mmengine.hub import get_config

import mmgroupmamba  # noqa: F401  (registers GroupMamba)
from mmgroupmamba.models.compiled import CompiledForward


def build(name, dynamic, backend):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        if name == 'Swin-T':
            cfg = get_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py').model.backbone
            cfg.pop('init_cfg', None)
            backbone = MODELS.build(cfg)
            compiled = CompiledForward('Swin-T', dict(dynamic=dynamic, fullgraph=False, backend=backend))
            return backbone, lambda x: compiled(backbone.forward, x)
        backbone = MODELS.build(dict(type='GroupMamba', arch='tiny', compile=dict(dynamic=dynamic, backend=backend)))
        return backbone, backbone


def step_seconds(run, size, device, batch=2):
    x = torch.randn(batch, 3, *size, device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.float16 if device == 'cuda' else torch.bfloat16):
        loss = sum(o.float().mean() for o in run(x))
    loss.backward()
    sync()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['GroupMamba-T', 'Swin-T'])
    parser.add_argument('--dynamic', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--size', nargs=2, type=int, default=[224, 224])
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    parser.add_argument('--backend', default='inductor', help="torch.compile's backend (aot_eager: no Inductor)")
    args = parser.parse_args()
    size = tuple(args.size)
    other = (size[0] + 32, size[1] - 32)
    print('| model | dynamic | first step s (compile) | second step s | step at a new size s |')
    print('| --- | --- | --- | --- | --- |')
    for dynamic in args.dynamic:
        for name in args.models:
            torch._dynamo.reset()
            backbone, run = build(name, bool(dynamic), args.backend)
            backbone.to(args.device).train()
            first = step_seconds(run, size, args.device)
            second = step_seconds(run, size, args.device)
            new = step_seconds(run, other, args.device)
            print(f'| {name} | {bool(dynamic)} | {first:.1f} | {second:.3f} | {new:.1f} |', flush=True)


if __name__ == '__main__':
    main()

"""Cost of one optimizer step of Mask R-CNN with GroupMamba-T: the config's merged param groups against
mmengine's default of one group per parameter, beside mmdet's own Swin-T Mask R-CNN config.

    python benchmarks/optimizer_step.py [--device cuda] [--steps 20]

AdamW with PyTorch's multi-tensor (``foreach``) implementation, the default on CUDA, runs its kernels once
per param group, so the group count sets the step's host work. Gradients are random; the step is timed
alone (``OptimWrapper.step``), fp32, after 3 warm-up steps.
"""
import argparse
import time

import torch
from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

CONFIG = 'configs/mmdet/mask_rcnn_groupmamba_t.py'


def step_ms(cfg, wrapper_cfg, device, steps):
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model).to(device)
    wrapper_cfg = dict(wrapper_cfg, type='OptimWrapper')
    wrapper_cfg['optimizer'] = dict(wrapper_cfg['optimizer'], foreach=True)
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(3):
        wrapper.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        wrapper.step()
    sync()
    return (time.perf_counter() - start) / steps * 1000, len(wrapper.optimizer.param_groups)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = Config.fromfile(CONFIG)
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope('mmdet')
    cfg.model.backbone.init_cfg = None
    swin = get_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', pretrained=False)
    swin.model.backbone.init_cfg = None
    per_param = {k: v for k, v in cfg.optim_wrapper.items() if k != 'constructor'}
    rows = [('GroupMamba-T, merged groups (config)', cfg, cfg.optim_wrapper),
            ('GroupMamba-T, one group per parameter', cfg, per_param),
            ("Swin-T, mmdet's config", swin, swin.optim_wrapper)]
    print(f'{device} ({torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}), AdamW foreach, fp32')
    print('| model | param groups | optimizer step ms |')
    print('| --- | --- | --- |')
    for name, model_cfg, wrapper_cfg in rows:
        ms, groups = step_ms(model_cfg, wrapper_cfg, device, args.steps)
        print(f'| {name} | {groups} | {ms:.1f} |', flush=True)


if __name__ == '__main__':
    main()

"""MergedGroupsOptimWrapperConstructor: the default constructor's per-parameter settings, in few groups."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

from mmgroupmamba.models.groupmamba import ARCH_SETTINGS
from mmgroupmamba.optim import merge_param_groups

CONFIG = Path(__file__).parents[1] / 'configs' / 'mmdet' / 'mask_rcnn_groupmamba_t.py'
SMALL_ARCH = ARCH_SETTINGS['mini']


def test_merge_param_groups_keeps_order_and_settings():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [dict(params=[a], lr=1.0, betas=[0.9, 0.99]), dict(params=[b], lr=2.0, betas=[0.9, 0.99]),
              dict(params=[c], lr=1.0, betas=[0.9, 0.99]), dict(params=[d], lr=1.0, betas=[0.9, 0.9])]
    merged = merge_param_groups(groups)
    assert [[id(p) for p in g['params']] for g in merged] == [[id(a), id(c)], [id(b)], [id(d)]]
    assert [(g['lr'], g['betas']) for g in merged] == [(1.0, [0.9, 0.99]), (2.0, [0.9, 0.99]), (1.0, [0.9, 0.9])]


def build_detector_and_wrappers():
    """The T detection config's model (small arch) with its optimizer wrapper, merged and per parameter."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(CONFIG))
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    assert cfg.optim_wrapper.constructor == 'MergedGroupsOptimWrapperConstructor'
    cfg.model.backbone.arch = SMALL_ARCH
    cfg.model.neck.in_channels = SMALL_ARCH['embed_dims']
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # fp32 wrapper (AMP needs a GPU); foreach: the multi-tensor path whose per-group launches the merge saves.
    wrapper_cfg = dict(cfg.optim_wrapper, type='OptimWrapper')
    wrapper_cfg['optimizer'] = dict(wrapper_cfg['optimizer'], foreach=True)
    per_param_cfg = {k: v for k, v in wrapper_cfg.items() if k != 'constructor'}
    other = copy.deepcopy(model)
    return model, build_optim_wrapper(model, wrapper_cfg), other, build_optim_wrapper(other, per_param_cfg)


def settings_by_name(model, optimizer):
    by_id = {}
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != 'params'}
        for param in group['params']:
            assert id(param) not in by_id, 'a parameter is in two groups'
            by_id[id(param)] = settings
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_merged_groups_hold_every_parameter_with_its_settings():
    model, merged, other, per_param = build_detector_and_wrappers()
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(per_param.optimizer.param_groups) == trainable  # the default: one group per parameter
    # Decay 0.05, and 0 for names containing `norm` (that group also carries custom_keys' decay_mult).
    assert len(merged.optimizer.param_groups) == 2
    assert settings_by_name(model, merged.optimizer) == settings_by_name(other, per_param.optimizer)


def test_merged_groups_step_like_per_parameter_groups_and_resume():
    model, merged, other, per_param = build_detector_and_wrappers()
    params = [p for p in model.parameters() if p.requires_grad]
    others = [p for p in other.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(params, others):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        merged.step()
        per_param.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    # Resuming: the merged optimizer's state loads into a freshly built one.
    state = copy.deepcopy(merged.state_dict())
    _, fresh, _, _ = build_detector_and_wrappers()
    fresh.load_state_dict(state)
    assert fresh.optimizer.state_dict()['state'][0]['step'] == 3


@pytest.mark.parametrize('config', ['configs/mmseg/upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py',
                                    'configs/mmpretrain/groupmamba_t_8xb128_in1k.py'])
def test_seg_and_cls_configs_use_it(config):
    cfg = Config.fromfile(str(Path(__file__).parents[1] / config))
    assert cfg.optim_wrapper.constructor == 'MergedGroupsOptimWrapperConstructor'

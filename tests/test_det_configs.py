"""Every config in configs/mmdet/ parses, builds its Mask R-CNN and feeds FPN the backbone's channels."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

from mmgroupmamba.models.groupmamba import ARCH_SETTINGS

CONFIG_DIR = Path(__file__).parents[1] / 'configs' / 'mmdet'
CONFIGS = sorted(CONFIG_DIR.glob('*.py'))
COCO_CONFIGS = {  # name: (arch, drop-path rate, epochs, lr steps)
    'mask_rcnn_groupmamba_t': ('tiny', 0.2, 12, [8, 11]),
    'mask_rcnn_groupmamba_s': ('small', 0.3, 12, [8, 11]),
    'mask_rcnn_groupmamba_b': ('base', 0.6, 12, [8, 11]),
    'mask_rcnn_groupmamba_t_ms_3x': ('tiny', 0.2, 36, [27, 33]),
    'mask_rcnn_groupmamba_s_ms_3x': ('small', 0.3, 36, [27, 33]),
    'mask_rcnn_groupmamba_b_ms_3x': ('base', 0.6, 36, [27, 33]),
}


def load(path):
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports.allow_failed_imports is False
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    return cfg


def test_all_configs_are_listed():
    assert {p.stem for p in CONFIGS} == set(COCO_CONFIGS) | {'mask_rcnn_groupmamba_demo_shapes',
                                                            'mask_rcnn_groupmamba_t_cuda_graph'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_builds_model_and_fpn_takes_backbone_channels(path):
    from mmdet.registry import MODELS
    cfg = load(path)
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'MaskRCNN'
    assert list(cfg.model.neck.in_channels) == model.backbone.embed_dims
    # The inherited ResNet backbone is fully replaced: no ResNet key leaks into GroupMamba's arguments.
    assert set(cfg.model.backbone) <= {'type', 'arch', 'out_indices', 'drop_path_rate', 'norm_eval', 'init_cfg',
                                       'cuda_graph'}
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [cfg.model.neck.out_channels] * cfg.model.neck.num_outs


@pytest.mark.parametrize('name', sorted(COCO_CONFIGS))
def test_coco_recipe(name):
    arch, drop_path_rate, epochs, milestones = COCO_CONFIGS[name]
    cfg = load(CONFIG_DIR / f'{name}.py')
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch, backbone.drop_path_rate) == ('GroupMamba', arch, drop_path_rate)
    assert backbone.norm_eval is True  # pretrained stem BatchNorm statistics are kept
    assert list(cfg.model.neck.in_channels) == ARCH_SETTINGS[arch]['embed_dims']
    assert backbone.init_cfg.type == 'Pretrained' and arch in backbone.init_cfg.checkpoint
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.train_cfg.max_epochs == epochs
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.by_epoch, steps.type, steps.milestones) == ('LinearLR', False, 'MultiStepLR',
                                                                           milestones)
    # 2 images per GPU on 8 GPUs, the batch auto_scale_lr scales from.
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    pipeline_types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert ('RandomChoice' in pipeline_types) == (epochs == 36)

"""CompileBackboneHook: any model's backbone compiled inside a stock mmengine run, as GroupMamba's own
``compile`` option does it (the comparisons with mmdet's Swin-T in the same mode go through it). On the CPU the
tests compile with ``aot_eager``."""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401  (registers the hook, as custom_imports does)
from mmgroupmamba import GroupMamba


class Regressor(BaseModel):
    def __init__(self, backbone=None):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = backbone or nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 3))
        self.head = nn.Linear(4, 1)

    def forward(self, inputs, targets, mode='loss'):
        features = self.backbone(torch.stack(inputs))
        features = features[-1] if isinstance(features, (tuple, list)) else features
        pred = self.head(features.mean((2, 3))).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((pred - torch.stack(targets)) ** 2).mean())
        return pred


class Images(Dataset):
    metainfo = dict(classes=('image', ))

    def __len__(self):
        return 6

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(3, 12, 12, generator=gen), targets=torch.tensor(float(index)))


def train(work_dir, hooks, model=None):
    runner = Runner(
        model=model or Regressor(), work_dir=str(work_dir), experiment_name=f'run_{len(hooks)}',
        train_dataloader=dict(dataset=Images(), sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=1e-2)), train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks, randomness=dict(seed=0))
    runner.train()
    return runner


def test_the_compiled_backbone_trains_as_eager_does(tmp_path):
    torch._dynamo.reset()
    compiled = train(tmp_path / 'c', [dict(type='CompileBackboneHook', options=dict(backend='aot_eager'))])
    eager = train(tmp_path / 'e', [])
    backbone = compiled.model.backbone
    assert backbone.forward.func._compiled is not None  # it ran through torch.compile
    for (name, a), b in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # A copy (EMA's deepcopy) starts uncompiled, with the forward of the copy itself.
    copied = copy.deepcopy(backbone)
    assert copied.forward.func._compiled is None and copied.forward.args[0].__self__ is copied
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(copied(x), backbone(x))


def test_compile_backbone_hook_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match='unknown compile option'):
        HOOKS.build(dict(type='CompileBackboneHook', options=dict(mod='max-autotune')))

    class NoBackbone(Regressor):
        def __init__(self):
            super().__init__()
            del self.backbone

    hooks = [dict(type='CompileBackboneHook')]
    with pytest.raises(AttributeError, match='NoBackbone has no backbone'):
        train(tmp_path / 'none', hooks, NoBackbone())
    with pytest.raises(ValueError, match='GroupMamba is already compiled by its own compile option'):
        train(tmp_path / 'own', hooks, Regressor(GroupMamba(arch='mini', compile=True)))


def test_the_swin_yardstick_config_compiles_only_its_backbone():
    """benchmarks/configs/mask_rcnn_swin_t_compiled_backbone.py: mmdet's own Swin-T Mask R-CNN, unchanged but
    for the hook (gpu_e2e.sh's det_compile yardstick)."""
    from pathlib import Path

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(str(Path(__file__).parents[1] / 'benchmarks/configs/mask_rcnn_swin_t_compiled_backbone.py'))
    assert cfg.custom_hooks == [dict(type='CompileBackboneHook', options=dict(fullgraph=False))]
    swin = get_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    assert {k: v for k, v in cfg.model.items() if k != '_scope_'} == swin.model
    init_default_scope(cfg.default_scope)
    assert type(MODELS.build(cfg.model).backbone).__name__ == 'SwinTransformer'
    assert [type(h).__name__ for h in (HOOKS.build(h) for h in cfg.custom_hooks)] == ['CompileBackboneHook']


def test_the_reduce_overhead_pair_of_configs():
    """benchmarks/configs' CUDA-graph pair (gpu_e2e.sh's det_compile_graphs and swin_compile_graphs): each model as
    its compiled config has it, only the compile mode added, and the mode reaching Inductor as CUDA graphs."""
    from pathlib import Path

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    configs = Path(__file__).parents[1] / 'benchmarks/configs'
    swin = Config.fromfile(str(configs / 'mask_rcnn_swin_t_compiled_graphs_backbone.py'))
    assert swin.custom_hooks == [dict(type='CompileBackboneHook', options=dict(fullgraph=False,
                                                                                 mode='reduce-overhead'))]
    hook = HOOKS.build(swin.custom_hooks[0])
    assert hook.options == dict(fullgraph=False, mode='reduce-overhead')
    groupmamba = Config.fromfile(str(configs / 'mask_rcnn_groupmamba_t_compiled_graphs.py'))
    plain = Config.fromfile(str(Path(__file__).parents[1] / 'configs/mmdet/mask_rcnn_groupmamba_t.py'))
    assert groupmamba.model.backbone.pop('compile') == dict(mode='reduce-overhead')
    assert groupmamba.model == plain.model
    init_default_scope(plain.default_scope)
    backbone = MODELS.build(dict(Config.fromfile(str(configs / 'mask_rcnn_groupmamba_t_compiled_graphs.py'))
                                 .model.backbone, init_cfg=None))
    assert backbone._compiled.options['options']['triton.cudagraphs']


def test_the_fixed_size_pair_of_configs():
    """benchmarks/configs' fixed-size pair (gpu_e2e.sh's det_compile_fixed and swin_compile_fixed): both pad their
    training batches to the CUDA-graph config's seven sizes, and compile their backbones once per size."""
    from pathlib import Path

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    root = Path(__file__).parents[1]
    graphs = Config.fromfile(str(root / 'configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py'))
    swin = Config.fromfile(str(root / 'benchmarks/configs/mask_rcnn_swin_t_compiled_fixed_sizes.py'))
    groupmamba = Config.fromfile(str(root / 'benchmarks/configs/mask_rcnn_groupmamba_t_compiled_fixed_sizes.py'))
    assert swin.model.data_preprocessor.batch_augments == graphs.model.data_preprocessor.batch_augments
    assert swin.custom_hooks == [dict(type='CompileBackboneHook', options=dict(fullgraph=False, dynamic=False))]
    assert groupmamba.model.backbone.pop('compile') == dict(dynamic=False)
    assert groupmamba.model.backbone.pop('cuda_graph') is False and graphs.model.backbone.pop('cuda_graph') is True
    assert groupmamba.model == graphs.model
    init_default_scope(swin.default_scope)
    detector = MODELS.build(swin.model)
    assert type(detector.backbone).__name__ == 'SwinTransformer'
    assert HOOKS.build(swin.custom_hooks[0]).options == dict(fullgraph=False, dynamic=False)
    # The batch padding is built in a fresh process: this one has imported mmgroupmamba.det already, and `mim
    # train` imports only what the config's custom_imports name (the Swin config once lacked the module).
    for config in ('mask_rcnn_swin_t_compiled_fixed_sizes.py', 'mask_rcnn_groupmamba_t_compiled_fixed_sizes.py'):
        _build_data_preprocessor_in_fresh_process(root / 'benchmarks/configs' / config)


def _build_data_preprocessor_in_fresh_process(config):
    import subprocess
    import sys

    script = '''import sys
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings
cfg = Config.fromfile(sys.argv[1])
import_modules_from_strings(**cfg.custom_imports)
init_default_scope(cfg.default_scope)
from mmdet.registry import MODELS
print([type(a).__name__ for a in MODELS.build(cfg.model.data_preprocessor).batch_augments])
'''
    result = subprocess.run([sys.executable, '-c', script, str(config)], capture_output=True, text=True, cwd='/')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['BatchPadToFixedSizes']"

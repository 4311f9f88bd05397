"""The training recipes against their sources.

* Classification: each parameter's weight decay, built from the T/S/B configs, against the official rule
  (GroupMamba's classification/utils/optimizer.py) applied to the official parameter names and shapes
  (../shared/golden/official_state_dict_*.tsv).
* Detection and segmentation: each parameter's weight decay against the rule in the task guide's recipe table.
* Every recipe table row that names a config key: the config holds the table's value.

The decay of a parameter is read through ``model.state_dict()``: each parameter is filled with the weight decay
of its optimizer param group, and the state dict's (official) keys then carry those values. So the checks do
not depend on how the model stores its parameters internally (e.g. packed across the four scan groups).
"""
import ast
import functools
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

from mmgroupmamba.cls.convert import KEY_MAP
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden'
SMALL_ARCH = ARCH_SETTINGS['mini']
CLS_CONFIGS = {'tiny': 'configs/mmpretrain/groupmamba_t_8xb128_in1k.py',
               'small': 'configs/mmpretrain/groupmamba_s_8xb128_in1k.py',
               'base': 'configs/mmpretrain/groupmamba_b_8xb128_in1k.py'}
# The official weight decay: classification/config.py, _C.TRAIN.WEIGHT_DECAY.
OFFICIAL_WEIGHT_DECAY = 0.05
BN_BUFFER_SUFFIXES = ('.running_mean', '.running_var', '.num_batches_tracked')
GUIDES = {'det': REPO / 'docs/detection.md', 'seg': REPO / 'docs/segmentation.md',
          'cls': REPO / 'docs/classification.md'}
DET_COCO_CONFIGS = ['mask_rcnn_groupmamba_t', 'mask_rcnn_groupmamba_s', 'mask_rcnn_groupmamba_b',
                    'mask_rcnn_groupmamba_t_ms_3x', 'mask_rcnn_groupmamba_s_ms_3x', 'mask_rcnn_groupmamba_b_ms_3x',
                    'mask_rcnn_groupmamba_t_cuda_graph']
SEG_ADE_CONFIGS = [f'upernet_groupmamba-{size}_8xb2-160k_ade20k-512x512' for size in 'tsb']


def load_config(path):
    cfg = Config.fromfile(str(REPO / path))
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    return cfg


def build_model(cfg):
    # The scope's registry (mmdet, mmseg, mmpretrain) builds the task's model; the root registry looks it up.
    return ROOT_MODELS.build(cfg.model)


def decay_by_state_dict_key(cfg, model):
    """``{state_dict key: weight decay}`` for every parameter entry of ``model.state_dict()``, with the optimizer
    built from ``cfg.optim_wrapper`` (as an fp32 OptimWrapper: mmengine's AmpOptimWrapper needs a GPU; the param
    groups come from the constructor and ``paramwise_cfg`` alone)."""
    optim_wrapper = build_optim_wrapper(model, dict(cfg.optim_wrapper, type='OptimWrapper'))
    seen = set()
    with torch.no_grad():
        for group in optim_wrapper.optimizer.param_groups:
            for param in group['params']:
                assert id(param) not in seen, 'a parameter is in two param groups'
                seen.add(id(param))
                param.fill_(group['weight_decay'])
    unoptimized = [name for name, p in model.named_parameters() if id(p) not in seen]
    assert not unoptimized, f'parameters in no param group: {unoptimized[:5]}'
    buffers = {name for name, _ in model.named_buffers()}
    return {key: value for key, value in model.state_dict().items() if key not in buffers}


def mismatches(decay_of, expected_of):
    """Keys whose values are not all equal to the expected decay, as readable lines."""
    wrong = []
    for key, expected in expected_of.items():
        value = decay_of[key]
        if not torch.all(value == torch.tensor(expected, dtype=value.dtype)):
            wrong.append(f'{key}: {sorted(set(value.flatten().tolist()))} instead of {expected}')
    return wrong


# ---------------------------------------------------------------------------------------------------- classification

def official_shapes(size):
    rows = (GOLDEN / f'official_state_dict_{size}.tsv').read_text().splitlines()[1:]
    return {k: tuple(int(d) for d in s.strip('()').split(',') if d.strip()) for k, s in (r.split('\t') for r in rows)}


def to_official_key(key):
    """The mmpretrain classifier's key -> the official model's (the inverse of mmgroupmamba.cls.convert)."""
    official = key.removeprefix('backbone.')
    for prefix, official_prefix in (('head.head.', 'head.'), ('head.dist_head.', 'dist_head.')):
        if key.startswith(prefix):
            official = official_prefix + key[len(prefix):]
    # The converter places this official key back at `key`: the two mappings agree.
    placed = [re.sub(pattern, repl, official) for pattern, repl in KEY_MAP if re.match(pattern, official)][:1]
    assert placed == [key], (key, official, placed)
    return official


def official_weight_decay(name, shape):
    """GroupMamba's classification/utils/optimizer.py, set_weight_decay: decay 0 for 1-D parameters and names
    ending in `.bias`; the official model defines no no_weight_decay() / no_weight_decay_keywords()."""
    return 0.0 if len(shape) == 1 or name.endswith('.bias') else OFFICIAL_WEIGHT_DECAY


@pytest.mark.parametrize('size', sorted(CLS_CONFIGS))
def test_classifier_weight_decay_is_the_official_rule(size):
    cfg = load_config(CLS_CONFIGS[size])
    assert cfg.optim_wrapper.optimizer.weight_decay == OFFICIAL_WEIGHT_DECAY
    model = build_model(cfg)
    decay_of = {to_official_key(k): v for k, v in decay_by_state_dict_key(cfg, model).items()}

    official = official_shapes(size)
    official_params = {k: shape for k, shape in official.items() if not k.endswith(BN_BUFFER_SUFFIXES)}
    # Every official parameter is in the model (and nothing else), with the official shape.
    assert {k: tuple(v.shape) for k, v in decay_of.items()} == official_params
    expected_of = {name: official_weight_decay(name, shape) for name, shape in official_params.items()}
    wrong = mismatches(decay_of, expected_of)
    assert not wrong, f'{len(wrong)} of {len(expected_of)} parameters decay differently:\n' + '\n'.join(wrong[:20])
    # The parameters the issue is about are covered: the 2-D scan parameters are decayed, the 1-D ones not.
    for leaf, decayed in (('A_logs', True), ('dt_projs_bias', True), ('Ds', False), ('skip_scale', False)):
        values = [expected_of[k] for k in expected_of if k.endswith('.' + leaf)]
        assert values and all((v > 0) == decayed for v in values), leaf


def test_ema_averages_every_parameter_and_buffer():
    """The classification EMA averages the whole state, as the official timm ModelEma: with
    ``update_buffers=True`` mmengine averages through ``state_dict()``, so each parameter must move there."""
    cfg = load_config(CLS_CONFIGS['tiny'])
    (ema_hook, ) = [hook for hook in cfg.custom_hooks if hook.type == 'EMAHook']
    assert ema_hook.type == 'EMAHook' and ema_hook.update_buffers is True and ema_hook.momentum == 1e-4
    cfg.model.backbone.arch = SMALL_ARCH
    cfg.model.head.num_classes = 10
    model = build_model(cfg)
    momentum = 0.25
    ema = ROOT_MODELS.build(dict(type='ExponentialMovingAverage', momentum=momentum, update_buffers=True),
                            default_args=dict(model=model))
    ema.update_parameters(model)  # the first update copies the model
    # By the averaged module's own tensors (not state_dict keys, which may name views of packed parameters).
    before = {name: tensor.detach().clone()
              for name, tensor in [*ema.module.named_parameters(), *ema.module.named_buffers()]}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(1.0)
    ema.update_parameters(model)
    # Non-persistent buffers (GroupMamba's stochastic-depth keep rates, constants of the config) are not state.
    constants = {f'{prefix}.{name}'.lstrip('.') for prefix, module in ema.module.named_modules()
                 for name in module._non_persistent_buffers_set}
    assert 'backbone.keep_rates' in constants
    for name, tensor in [*ema.module.named_parameters(), *ema.module.named_buffers()]:
        if tensor.is_floating_point() and name not in constants:
            # Each value moves by momentum * (source - average) = momentum * 1.
            assert torch.allclose(tensor, before[name] + momentum, atol=1e-6), name
    assert any(name.endswith('running_mean') for name in before)  # the stem's BatchNorm statistics are averaged


# ---------------------------------------------------------------------------------------------------- recipe tables

def recipe_tables(guide):
    """The recipe tables of a task guide: ``[(config path, [row dict, ...])]``.

    A recipe table's header starts with ``hyper-parameter | config key | ours (`CONFIG`)``; each row has the
    columns hyper-parameter, config key (a backticked dotted key, or - for none), ours, source, source file,
    difference. Where a row names a config key, the ours cell starts with the value as a backticked Python
    literal."""
    tables, lines = [], guide.read_text().splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[:2] == ['hyper-parameter', 'config key']:
            (config, ) = re.findall(r'`([^`]+\.py)`', cells[2])
            rows = []
            for row_line in lines[i + 2:]:
                if not row_line.startswith('|'):
                    break
                row = [c.strip() for c in row_line.strip().strip('|').split('|')]
                assert len(row) == 6, f'{guide.name}: a recipe row needs 6 cells: {row_line}'
                assert re.search(r'`[^`]+`', row[4]), f'{guide.name}: the source file cell names no file: {row_line}'
                rows.append(dict(zip(('name', 'key', 'ours', 'source', 'source_file', 'difference'), row)))
            tables.append((config, rows))
    assert tables, f'{guide.name} has no recipe table'
    return tables


def cell_literal(cell):
    """The value a cell starts with: its first backticked Python literal."""
    match = re.match(r'`([^`]+)`', cell)
    assert match, f'the cell does not start with a backticked value: {cell}'
    return ast.literal_eval(match.group(1))


@functools.lru_cache(maxsize=None)
def parsed_config(path):
    # Parsed once for all rows of its table (the mmdet and mmseg bases take seconds to parse); only read.
    return Config.fromfile(str(REPO / path))


def config_value(cfg, key):
    value = cfg
    for part in key.split('.'):
        if isinstance(value, (list, tuple)):
            value = value[int(part)]
        else:
            assert part in value, f'{key}: the config has no {part!r}'
            value = value[part]
    return value


def plain(value):
    """A config value as plain data for comparison: lists for tuples, dicts without mmengine's `_scope_`."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def table_rows(task):
    return [(config, row) for config, rows in recipe_tables(GUIDES[task]) for row in rows]


def keyed_rows():
    params = []
    for task in GUIDES:
        for config, row in table_rows(task):
            if row['key'] not in ('-', '–'):
                params.append(pytest.param(config, row, id=f'{task}:{Path(config).stem}:{row["name"]}'))
    return params


@pytest.mark.parametrize('config, row', keyed_rows())
def test_recipe_table_values_are_the_configs(config, row):
    (key, ) = re.fullmatch(r'`([^`]+)`', row['key']).groups()
    cfg = parsed_config(config)
    assert plain(config_value(cfg, key)) == plain(cell_literal(row['ours'])), row['name']


def no_decay_keys(task, config):
    """The name substrings the guide's table gives decay 0 (`weight decay 0 for` row) and the base decay."""
    rows = {row['name']: row for table_config, row in table_rows(task) if table_config == config}
    base = cell_literal(rows['weight decay']['ours'])
    custom_keys = cell_literal(rows['weight decay 0 for']['ours'])
    assert all(set(setting) == {'decay_mult'} for setting in custom_keys.values())
    return base, [key for key, setting in custom_keys.items() if setting['decay_mult'] == 0.0]


@pytest.mark.parametrize('task, name', [('det', name) for name in DET_COCO_CONFIGS] +
                         [('seg', name) for name in SEG_ADE_CONFIGS])
def test_det_and_seg_weight_decay_follow_the_recipe_table(task, name):
    folder = {'det': 'configs/mmdet', 'seg': 'configs/mmseg'}[task]
    # S, B, 3x and CUDA-graph configs inherit the T config's optimizer: its table row holds for them.
    table_config = {'det': 'configs/mmdet/mask_rcnn_groupmamba_t.py',
                    'seg': f'configs/mmseg/{SEG_ADE_CONFIGS[0]}.py'}[task]
    base, zero_keys = no_decay_keys(task, table_config)
    cfg = load_config(f'{folder}/{name}.py')
    assert cfg.optim_wrapper.optimizer.weight_decay == base
    model = build_model(cfg)
    decay_of = decay_by_state_dict_key(cfg, model)
    expected_of = {key: 0.0 if any(k in key for k in zero_keys) else base for key in decay_of}
    wrong = mismatches(decay_of, expected_of)
    assert not wrong, f'{len(wrong)} of {len(expected_of)} parameters decay differently:\n' + '\n'.join(wrong[:20])
    # What the rule means for GroupMamba: only the backbone's LayerNorms are spared; the scan parameters, the
    # biases and the stem's BatchNorm (patch_embed1.conv.*) are decayed, as VMamba decays its own.
    spared = {k for k, v in expected_of.items() if v == 0.0}
    assert spared and all(k.startswith('backbone.') and 'norm' in k for k in spared)
    for leaf in ('.A_logs', '.Ds', '.dt_projs_bias', '.skip_scale', 'patch_embed1.conv.1.weight'):
        assert any(leaf in k for k in expected_of) and not any(leaf in k for k in spared), leaf


@pytest.mark.parametrize('path', [f'configs/mmdet/{n}.py' for n in DET_COCO_CONFIGS] +
                         [f'configs/mmseg/{n}.py' for n in SEG_ADE_CONFIGS])
def test_reference_fp32_recipe_is_one_option_away(path):
    """`--cfg-options optim_wrapper.type=OptimWrapper` gives VMamba's fp32 wrapper: nothing AMP-specific stays."""
    cfg = Config.fromfile(str(REPO / path))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    cfg.merge_from_dict({'optim_wrapper.type': 'OptimWrapper'})
    assert set(cfg.optim_wrapper) <= {'type', 'optimizer', 'paramwise_cfg', 'constructor', '_scope_'}
    for guide in (GUIDES['det'], GUIDES['seg']):
        assert '--cfg-options optim_wrapper.type=OptimWrapper' in guide.read_text()

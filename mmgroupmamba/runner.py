"""A Runner that checks, before it builds dataloaders, optimizer or weights, that the config can run here.

mmengine's Runner builds the model, prints the config and then fails at the first missing thing, deep inside a
dataset or a loader: ``FileNotFoundError: ... instances_train2017.json`` with nothing about where COCO goes,
then, once the data is there, the next missing file, then ``AmpOptimizerWrapper is only available training on
gpu``. :class:`PreflightRunner` checks first what ``train()``, ``val()`` or ``test()`` will read (the dataloaders'
data, evaluators' annotation files, the model's ``checkpoint`` files, ``load_from``) and whether the optimizer
wrapper can run here, and reports every problem at once, each with its fix. (The model itself is built, and the
config printed, by ``Runner.__init__``, before it is known whether ``train``, ``val`` or ``test`` follows.)

The configs select it with ``runner_type='PreflightRunner'``, which the stock ``tools/train.py`` of mmdet,
mmseg and mmpretrain (so ``mim train``) and mmdet's ``tools/test.py`` honour. A config says where its data
comes from in ``missing_data_help``, printed with missing data.
"""
import json
import os
import os.path as osp

from mmengine.device import is_cuda_available, is_mlu_available, is_musa_available, is_npu_available
from mmengine.registry import DATASETS, RUNNERS
from mmengine.runner import Runner

from mmgroupmamba.checkpoint import official_weights_help
from mmgroupmamba.models.groupmamba import arch_name

# Guides by the config's default scope, for problems the config's own help does not cover.
GUIDES = {'mmdet': 'docs/detection.md', 'mmseg': 'docs/segmentation.md', 'mmpretrain': 'docs/classification.md'}


class ConfigNotReadyError(RuntimeError):
    """What a config needs that this machine does not have (yet), with the fixes."""


@RUNNERS.register_module()
class PreflightRunner(Runner):
    """mmengine's ``Runner`` that checks the config's files and device before ``train``, ``val`` and ``test``."""

    def train(self):
        loaders = ['train_dataloader']
        if all(self.cfg.get(key) is not None for key in ('val_dataloader', 'val_cfg', 'val_evaluator')):
            loaders.append('val_dataloader')
        self.check_ready('train', loaders, model_checkpoints=True, optimizer=True)
        return super().train()

    def val(self):
        self.check_ready('validate', ['val_dataloader'])
        return super().val()

    def test(self):
        self.check_ready('test', ['test_dataloader'])
        return super().test()

    def check_ready(self, action, loaders, model_checkpoints=False, optimizer=False):
        """Raise :class:`ConfigNotReadyError` listing everything ``action`` needs that is missing here."""
        missing_data = {}  # path -> config keys that read it
        for loader in loaders:
            dataset = (self.cfg.get(loader) or {}).get('dataset')
            generated = _collect_missing_dataset_paths(dataset, f'{loader}.dataset', missing_data)
            evaluator = self.cfg.get(loader.replace('_dataloader', '_evaluator'))
            if not generated:  # a dataset that writes its data on first use also writes the evaluator's file
                _collect_missing_evaluator_paths(evaluator, loader.replace('_dataloader', '_evaluator'),
                                                 missing_data)
        problems = []
        if missing_data:
            lines = [f'{path} does not exist ({", ".join(keys)})' for path, keys in missing_data.items()]
            help_text = (self.cfg.get('missing_data_help') or f'See {self._guide()} for the data this config reads')
            help_text = help_text.rstrip('. ')
            problems.append('Data: ' + '; '.join(lines) + f'. {help_text}. Paths are relative to {os.getcwd()}; '
                            'point the config at data elsewhere with --cfg-options '
                            f'{loaders[0]}.dataset.data_root=DIR (and the other dataloaders alike).')
        else:  # the annotation files are there to read
            for loader in loaders:
                problems += _coco_class_problems(self.cfg, loader, self._guide())
        checkpoints = []
        if model_checkpoints:
            checkpoints += _model_checkpoints(self.cfg.get('model'), 'model')
        if self._load_from:
            checkpoints.append(('load_from', self._load_from, None))
        for key, path, owner in checkpoints:
            if '://' in path or osp.isfile(osp.expanduser(path)):
                continue
            problem = f'Checkpoint: {path} does not exist ({key}).'
            if owner is not None and owner.get('type') == 'GroupMamba':
                arch = owner.get('arch')
                problem += ' ' + official_weights_help(None if arch is None else arch_name(arch))
            elif key != 'load_from':
                problem += f' See {self._guide()} for where it comes from.'
            problems.append(problem)
        if optimizer:
            problems += self._optimizer_problems()
        if problems:
            listed = '\n'.join(f'  {i}. {problem}' for i, problem in enumerate(problems, 1))
            raise ConfigNotReadyError(f'Cannot {action} with this config here yet:\n{listed}')

    def _optimizer_problems(self):
        wrapper = self.cfg.get('optim_wrapper') or {}
        wrapper_type = wrapper.get('type')
        if getattr(wrapper_type, '__name__', wrapper_type) != 'AmpOptimWrapper':
            return []
        # The devices mmengine's AmpOptimWrapper accepts.
        if is_cuda_available() or is_npu_available() or is_mlu_available() or is_musa_available():
            return []
        return ["Device: optim_wrapper.type='AmpOptimWrapper' (mixed precision) needs a GPU, and torch finds none "
                'here. To train on this CPU in fp32, add --cfg-options optim_wrapper.type=OptimWrapper to the '
                'command (and leave out --amp).']

    def _guide(self):
        return GUIDES.get(self.cfg.get('default_scope'), 'the docs/ guide of this task')


def _collect_missing_dataset_paths(dataset, key, missing):
    """Add the paths ``dataset`` (a config dict) reads that do not exist; return whether it writes its own data."""
    if not isinstance(dataset, dict):
        return False  # a built dataset object: nothing left to check
    if 'dataset' in dataset or 'datasets' in dataset:  # wrappers: ConcatDataset, RepeatDataset, ...
        inner = dataset.get('datasets') or [dataset.get('dataset')]
        return any([_collect_missing_dataset_paths(d, f'{key}.datasets[{i}]' if 'datasets' in dataset
                                                   else f'{key}.dataset', missing) for i, d in enumerate(inner)])
    if getattr(_dataset_class(dataset.get('type')), 'creates_missing_data', False):
        return True
    data_root = dataset.get('data_root') or ''
    if '://' in data_root:
        return False  # a remote storage backend: not a path here
    if data_root and not osp.isdir(data_root):
        missing.setdefault(data_root, []).append(f'{key}.data_root')
        return False
    paths = []
    if dataset.get('ann_file'):
        paths.append(('ann_file', dataset['ann_file']))
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, dict):
        paths += [(f'data_prefix.{name}', value) for name, value in prefix.items() if value]
    elif prefix:
        paths.append(('data_prefix', prefix))
    elif isinstance(dataset.get('split'), str) and dataset['split']:  # mmpretrain's ImageNet reads data_root/split
        paths.append(('split', dataset['split']))
    for name, path in paths:
        if not isinstance(path, str) or '://' in path:
            continue
        full = path if osp.isabs(path) or not data_root else osp.join(data_root, path)
        if not osp.exists(full):
            missing.setdefault(full, []).append(f'{key}.{name}')
    return False


def _collect_missing_evaluator_paths(evaluator, key, missing):
    evaluators = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for i, metric in enumerate(evaluators):
        ann_file = metric.get('ann_file') if isinstance(metric, dict) else None
        if isinstance(ann_file, str) and '://' not in ann_file and not osp.exists(ann_file):
            missing.setdefault(ann_file, []).append(f'{key}{f"[{i}]" if len(evaluators) > 1 else ""}.ann_file')


def _coco_class_problems(cfg, loader, guide):
    """Classes that mmdet's ``CocoMetric`` could not map back to the annotation file's categories.

    The metric maps a predicted label ``i`` to the ``i``-th of the dataset's classes found among the annotation
    file's categories. A head with more classes than that, or a class missing from the file, ends the first
    evaluation, after a whole epoch of training, with ``IndexError: list index out of range`` in
    ``results2json``. This happens with a COCO-format folder of other categories and the configs' 80 COCO classes.
    """
    evaluator_key = loader.replace('_dataloader', '_evaluator')
    evaluators = cfg.get(evaluator_key)
    evaluators = evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]
    dataset = (cfg.get(loader) or {}).get('dataset')
    problems = []
    for metric in evaluators:
        metric_type = metric.get('type') if isinstance(metric, dict) else None
        ann_file = metric.get('ann_file') if isinstance(metric, dict) else None
        if getattr(metric_type, '__name__', metric_type) != 'CocoMetric' or not isinstance(dataset, dict) \
                or not isinstance(ann_file, str) or not osp.isfile(ann_file):
            continue
        classes = (dataset.get('metainfo') or {}).get('classes')
        classes_key = f'{loader}.dataset.metainfo.classes'
        if classes is None:
            classes = getattr(_dataset_class(dataset.get('type')), 'METAINFO', {}).get('classes')
            classes_key = f"{dataset.get('type')}'s default classes"
        if not classes:
            continue
        with open(ann_file) as f:
            categories = {category['name'] for category in json.load(f).get('categories', [])}
        found = [name for name in classes if name in categories]
        missing = [name for name in classes if name not in categories]
        heads = _num_classes(cfg.get('model'), 'model')
        mismatched = [(key, n) for key, n in heads if n != len(found)]
        if not missing and not mismatched:
            continue
        problem = (f'Classes: mmdet\'s CocoMetric ({evaluator_key}) can map predictions to {len(found)} categories '
                   f'of {ann_file}, the dataset\'s {len(classes)} classes ({classes_key}) found there')
        if missing:
            shown = ', '.join(repr(name) for name in missing[:5]) + (', ...' if len(missing) > 5 else '')
            problem += f'; {len(missing)} of the classes are not among its categories ({shown})'
        if mismatched:
            problem += '; ' + ', '.join(f'{key}={n}' for key, n in mismatched) + ' predict another number of labels'
        problem += ('. The first evaluation would stop with "IndexError: list index out of range". For a dataset of '
                    'your own categories, name them in every dataloader\'s dataset (--cfg-options '
                    f'{loader}.dataset.metainfo.classes="(a,b,c)" and the other dataloaders alike) and give the heads '
                    'as many classes (' + ' '.join(f'{key}=N' for key, _ in heads) + f'); see {guide}.')
        problems.append(problem)
    return problems


def _num_classes(cfg, key):
    """``(config key, num_classes)`` of the model's class-predicting heads (the RPN's one "object" class left
    out)."""
    return [(f'{owner_key}.num_classes', value) for owner_key, name, value, _ in _config_items(cfg, key)
            if name == 'num_classes' and isinstance(value, int) and 'rpn_head' not in owner_key]


def _config_items(cfg, key):
    """Every ``(owner's key, name, value, owner)`` of the dicts nested in a config value, depth first."""
    if isinstance(cfg, dict):
        for name, value in cfg.items():
            yield key, name, value, cfg
            yield from _config_items(value, f'{key}.{name}')
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            yield from _config_items(value, f'{key}[{i}]')


def _dataset_class(dataset_type):
    if isinstance(dataset_type, type):
        return dataset_type
    if not isinstance(dataset_type, str):
        return None
    # The registry of the runner's default scope (mmdet, mmseg, ...), falling back to its parents.
    with DATASETS.switch_scope_and_registry(None) as registry:
        return registry.get(dataset_type)


def _model_checkpoints(cfg, key):
    """``(config key, path, owner)`` of every checkpoint file named in a model config.

    ``owner`` is the module config whose ``init_cfg`` names the file (its type and arch tell which official weights
    fit), or None for other ``checkpoint`` keys (e.g. a distillation teacher's).
    """
    found = []
    for owner_key, name, value, owner in _config_items(cfg, key):
        if name == 'init_cfg' and isinstance(value, dict) and isinstance(value.get('checkpoint'), str):
            found.append((f'{owner_key}.init_cfg.checkpoint', value['checkpoint'], owner))
        elif name == 'checkpoint' and isinstance(value, str) and not owner_key.endswith('.init_cfg'):
            found.append((f'{owner_key}.checkpoint', value, None))
    return found

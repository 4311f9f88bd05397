"""An interrupted training, resumed, ends exactly where the uninterrupted one does (issue #20).

For each task's demo config, shrunk to a few iterations on tiny generated data: the run stopped by an exception
right after a checkpoint (a crash at that moment) and resumed from it in a new Runner ends with model state,
EMA parameters, optimizer state, param schedulers and every logged loss bitwise equal to the uninterrupted
run's. The runs and the comparison are those of ``benchmarks/resume_check.py``.
"""
import copy
import subprocess
import sys
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
from resume_check import compare, report, run_stage, stage_config  # noqa: E402

CLS_CONFIG = REPO / 'configs/mmpretrain/demo/groupmamba_mini_distill_demo.py'
DET_CONFIG = REPO / 'configs/mmdet/mask_rcnn_groupmamba_demo_shapes.py'
SEG_CONFIG = REPO / 'configs/mmseg/upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py'
TINY_TEACHER = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64))


def loaders(cfg):
    return [cfg[name] for name in ('train_dataloader', 'val_dataloader', 'test_dataloader') if cfg.get(name)]


def set_workers(cfg, num_workers):
    for loader in loaders(cfg):
        loader.update(num_workers=num_workers, persistent_workers=False)


def cls_cfg(tmp_path):
    """The classification demo (Mixup/CutMix, stochastic depth, EMA, distillation) on 10 images of 32x32,
    5 per batch: 2 iterations per epoch, 4 epochs, validation every 2."""
    from mmpretrain.registry import MODELS

    from mmgroupmamba.cls.demo_data import make_demo_imagenet
    root = make_demo_imagenet(str(tmp_path / 'data'), num_classes=10, train_per_class=1, val_per_class=1, size=32)
    init_default_scope('mmpretrain')
    torch.manual_seed(1)
    teacher = tmp_path / 'teacher.pth'
    torch.save(MODELS.build(copy.deepcopy(TINY_TEACHER)).state_dict(), teacher)
    cfg = Config.fromfile(str(CLS_CONFIG))
    cfg.model.teacher = dict(model=copy.deepcopy(TINY_TEACHER), checkpoint=str(teacher))
    for loader in loaders(cfg):
        loader.update(batch_size=5)
        loader.dataset.data_root = root
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline):
        for step in pipeline:
            if step['type'] in ('RandomResizedCrop', 'CenterCrop', 'ResizeEdge'):
                step.update({'scale' if 'scale' in step else 'crop_size': 32})
    cfg.train_cfg.update(max_epochs=4, val_interval=2)
    cfg.default_hooks.logger.interval = 1
    return cfg


def det_cfg(tmp_path):
    """The detection demo (random flips, RPN and RoI sampling) on 8 shapes images of 64x64, 4 per batch:
    2 iterations per epoch, 2 epochs, no validation."""
    cfg = Config.fromfile(str(DET_CONFIG))
    data_root = f'{tmp_path}/shapes/'
    cfg.train_dataloader.update(batch_size=4)
    cfg.train_dataloader.dataset.update(data_root=data_root, num_images=8, image_size=64, max_size=30, min_size=12)
    for step in cfg.train_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['scale'] = (64, 64)
    cfg.val_dataloader = cfg.test_dataloader = cfg.val_cfg = cfg.test_cfg = None
    cfg.val_evaluator = cfg.test_evaluator = None
    cfg.train_cfg.update(max_epochs=2)
    cfg.default_hooks.logger.interval = 1
    return cfg


def seg_cfg(tmp_path):
    """The segmentation demo (random resize, crop, flip, photometric distortion; stochastic depth switched on)
    on 6 generated scenes, 64x64 crops, 2 per batch: 4 iterations, validation on 2 scenes every 2."""
    from mmgroupmamba.seg.demo_data import make_demo_dataset
    data_root = tmp_path / 'ade_demo'
    make_demo_dataset(str(data_root), num_train=6, num_val=2, seed=0)
    cfg = Config.fromfile(str(SEG_CONFIG))
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.backbone.drop_path_rate = 0.1
    for loader in loaders(cfg):
        loader.dataset.data_root = str(data_root)
    cfg.train_dataloader.batch_size = 2
    for step in cfg.train_dataloader.dataset.pipeline:
        if step['type'] == 'RandomCrop':
            step['crop_size'] = (64, 64)
    cfg.train_cfg.update(max_iters=4, val_interval=2)
    cfg.default_hooks.logger.interval = 1
    return cfg


def run_interrupted_and_resumed(cfg, tmp_path, interrupt_at, seed=0, full_seed=None):
    """The three runs of resume_check.py in this process. ``seed=None``: the interrupted and the resumed run
    draw their own seeds, as a config without ``randomness.seed`` does; the full run takes the interrupted
    run's (or ``full_seed``)."""
    def configured(stage, run_seed, resume_from=None):
        stage_cfg = copy.deepcopy(cfg)
        stage_cfg.randomness = dict(seed=run_seed, deterministic=True)
        return stage_config(stage_cfg, stage, tmp_path / stage, interrupt_at, resume_from)

    interrupted = run_stage(configured('interrupted', seed), 'interrupted', interrupt_at)
    full = run_stage(configured('full', interrupted['seed'] if full_seed is None else full_seed), 'full',
                     interrupt_at)
    resumed = run_stage(configured('resumed', seed, interrupted['checkpoint']), 'resumed', interrupt_at)
    return full, interrupted, resumed


def assert_resumed_equals_full(full, interrupted, resumed, expected_groups):
    after = torch.load(interrupted['checkpoint'], weights_only=True)['meta']['iter']
    differences = compare(full, resumed, after_iter=after)
    table = report(differences, 'resumed vs full')
    assert expected_groups <= set(differences), table
    assert any(name.startswith('logged loss') for name in differences), table
    assert all(d.identical and d.leaves for d in differences.values()), table


def test_classification_demo_resumes_exactly(tmp_path):
    cfg = cls_cfg(tmp_path)
    set_workers(cfg, 0)
    runs = run_interrupted_and_resumed(cfg, tmp_path, interrupt_at=2)
    assert_resumed_equals_full(*runs, {'model state', 'EMA parameters', 'optimizer state', 'param schedulers'})


def test_detection_demo_resumes_exactly(tmp_path):
    cfg = det_cfg(tmp_path)
    set_workers(cfg, 0)
    runs = run_interrupted_and_resumed(cfg, tmp_path, interrupt_at=1)
    assert_resumed_equals_full(*runs, {'model state', 'optimizer state', 'param schedulers'})


def test_segmentation_demo_resumes_exactly(tmp_path):
    cfg = seg_cfg(tmp_path)
    set_workers(cfg, 0)
    runs = run_interrupted_and_resumed(cfg, tmp_path, interrupt_at=2)
    assert_resumed_equals_full(*runs, {'model state', 'optimizer state', 'param schedulers'})


def test_segmentation_demo_resumes_exactly_with_a_worker_and_no_seed_set(tmp_path):
    """A dataloader worker draws the augmentation, and ``randomness.seed`` is unset (mmpretrain's, mmdet's and
    mmseg's default): the resumed run starts with a seed of its own, so its InfiniteSampler and its worker
    would take other seeds than the interrupted run's unless they are set back."""
    cfg = seg_cfg(tmp_path)
    set_workers(cfg, 1)
    full, interrupted, resumed = run_interrupted_and_resumed(cfg, tmp_path, interrupt_at=2, seed=None)
    assert_resumed_equals_full(full, interrupted, resumed, {'model state', 'optimizer state', 'param schedulers'})
    # mmengine drew another seed for the resumed run and built its dataloader with it; the hook set it back.
    log = next(Path(resumed['log_dir']).glob('*.log')).read_text()
    assert 'sampler seed ' in log and f'-> {interrupted["seed"]}, worker_init_fn seed ' in log, log[-3000:]


def test_resume_check_script_on_the_segmentation_demo(tmp_path):
    """benchmarks/resume_check.py as the lead runs it on a GPU: three processes, then the comparison table."""
    from mmgroupmamba.seg.demo_data import make_demo_dataset
    data_root = tmp_path / 'ade_demo'
    make_demo_dataset(str(data_root), num_train=4, num_val=1, seed=0)
    options = [f'{loader}.dataset.data_root={data_root}' for loader in ('train_dataloader', 'val_dataloader')]
    options += ['train_cfg.max_iters=4', 'train_cfg.val_interval=10', 'train_dataloader.batch_size=2',
                'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
                'train_dataloader.dataset.pipeline.3.crop_size=(64,64)', 'model.data_preprocessor.size=(64,64)',
                'model.backbone.drop_path_rate=0.1']
    result = subprocess.run(
        [sys.executable, str(REPO / 'benchmarks/resume_check.py'), str(SEG_CONFIG), '--interrupt-at', '2',
         '--work-dir', str(tmp_path / 'check'), '--cfg-options', *options],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    out = result.stdout
    assert 'resumed run equals the uninterrupted one bitwise' in out, out
    assert 'restored the random states of iteration 2' in out, out
    table = out[out.index('resumed vs full'):]
    for row in ('model state', 'optimizer state', 'random states', 'logged loss', 'logged decode.loss_ce'):
        assert f'\n{row} ' in table and 'bitwise equal' in table.split(f'\n{row} ')[1].splitlines()[0], table

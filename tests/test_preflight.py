"""A first `mim train` without the data, weights or GPU a config needs: one error listing each, with its fix
(issue #17, item 1). Run from an empty directory, as a new user would, through the stock mim commands."""
import os
import subprocess
import sys
from pathlib import Path

from mmgroupmamba.checkpoint import OFFICIAL_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def mim_train_error(cwd, *args):
    """The last error of the task's tools/train.py under `mim train` (mim's own traceback follows it)."""
    result = subprocess.run([sys.executable, '-m', 'mim', 'train', *args], cwd=cwd, capture_output=True, text=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert result.returncode != 0, result.stdout[-2000:]
    train_error = result.stderr[:result.stderr.rindex('Traceback (most recent call last):')]
    return train_error[train_error.rindex('Traceback (most recent call last):'):]


def test_detection_without_coco_weights_or_gpu(tmp_path):
    error = mim_train_error(tmp_path, 'mmdet', str(REPO / 'configs/mmdet/mask_rcnn_groupmamba_t.py'), '--cfg-options',
                            'model.backbone.init_cfg.checkpoint=checkpoints/groupmamba_tiny.pth')
    message = error[error.index('ConfigNotReadyError: Cannot'):]
    assert message.startswith('ConfigNotReadyError: Cannot train with this config here yet:'), error[-3000:]
    # Where COCO goes, the guide, and that nothing else (a traceback from inside a dataset) came first.
    assert 'data/coco/ does not exist (train_dataloader.dataset.data_root, val_dataloader.dataset.data_root)' in \
        message, message
    assert 'data/coco/annotations/instances_val2017.json does not exist (val_evaluator.ann_file)' in message
    assert 'COCO 2017 goes in data/coco/' in message and 'docs/detection.md' in message
    assert f'relative to {tmp_path}' in message
    # Where the official weights are.
    assert 'checkpoints/groupmamba_tiny.pth does not exist (model.backbone.init_cfg.checkpoint)' in message
    assert OFFICIAL_WEIGHTS['tiny'] in message
    # AMP on a CPU: the option that trains in fp32.
    assert '--cfg-options optim_wrapper.type=OptimWrapper' in message
    assert 'instances_train2017.json' not in error[:error.index('ConfigNotReadyError: Cannot')]


def test_segmentation_without_ade20k(tmp_path):
    config = REPO / 'configs/mmseg/upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'
    error = mim_train_error(tmp_path, 'mmseg', str(config))
    message = error[error.index('ConfigNotReadyError: Cannot'):]
    assert 'data/ade/ADEChallengeData2016 does not exist (train_dataloader.dataset.data_root' in message, message
    assert 'docs/segmentation.md' in message and 'python -m mmgroupmamba.seg.demo_data' in message
    assert '--cfg-options optim_wrapper.type=OptimWrapper' in message


def test_classification_without_imagenet_or_teacher(tmp_path):
    error = mim_train_error(tmp_path, 'mmpretrain', str(REPO / 'configs/mmpretrain/groupmamba_t_8xb128_in1k.py'))
    message = error[error.index('ConfigNotReadyError: Cannot'):]
    assert 'data/imagenet does not exist (train_dataloader.dataset.data_root' in message, message
    assert 'docs/classification.md' in message
    assert 'checkpoints/regnety_160-a5fe301d.pth does not exist (model.teacher.checkpoint)' in message
    assert '--cfg-options optim_wrapper.type=OptimWrapper' in message


def test_demo_data_not_generated_yet(tmp_path):
    config = REPO / 'configs/mmseg/upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py'
    error = mim_train_error(tmp_path, 'mmseg', str(config), '--gpus', '0')
    message = error[error.index('ConfigNotReadyError: Cannot'):]
    assert 'data/ade_demo does not exist' in message, message
    assert 'python -m mmgroupmamba.seg.demo_data --out data/ade_demo' in message
    assert 'optim_wrapper' not in message  # the demo trains in fp32 already

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


def _coco_folder(root):
    """``root/annotations/instances_{train,val}2017.json`` and images: the shapes dataset in COCO's layout (3
    categories: rectangle, ellipse, triangle)."""
    from mmgroupmamba.det.shapes_coco import generate_shapes_coco
    for split in ('train2017', 'val2017'):
        generate_shapes_coco(str(root / 'annotations' / f'instances_{split}.json'), str(root / split), num_images=2,
                             image_size=64, max_objects=1, min_size=20, max_size=40)


def test_detection_on_a_coco_folder_of_other_categories(tmp_path):
    """A COCO-format folder of its own 3 categories under the 80-class COCO config trained a whole epoch and then
    stopped in mmdet's CocoMetric with `IndexError: list index out of range` (seen on an H200 with a stand-in for
    COCO). Now the first command says so, with the options that fit the heads to the data."""
    _coco_folder(tmp_path / 'data' / 'coco')
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'groupmamba_tiny.pth').write_bytes(b'')  # exists: not this test's problem
    error = mim_train_error(tmp_path, 'mmdet', str(REPO / 'configs/mmdet/mask_rcnn_groupmamba_t.py'), '--cfg-options',
                            'model.backbone.init_cfg.checkpoint=checkpoints/groupmamba_tiny.pth',
                            'optim_wrapper.type=OptimWrapper')
    message = error[error.index('ConfigNotReadyError: Cannot'):]
    assert ("Classes: mmdet's CocoMetric (val_evaluator) can map predictions to 0 categories of "
            "data/coco/annotations/instances_val2017.json, the dataset's 80 classes (CocoDataset's default classes) "
            "found there; 80 of the classes are not among its categories ('person', 'bicycle', 'car', "
            "'motorcycle', 'airplane', ...)") in message, message
    assert 'model.roi_head.bbox_head.num_classes=80, model.roi_head.mask_head.num_classes=80 predict another' in message
    assert 'IndexError' in message and 'docs/detection.md' in message
    assert 'val_dataloader.dataset.metainfo.classes="(a,b,c)"' in message
    assert 'model.roi_head.bbox_head.num_classes=N model.roi_head.mask_head.num_classes=N' in message


def test_coco_class_check_names_what_differs(tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmgroupmamba.runner import _coco_class_problems
    init_default_scope('mmdet')
    root = tmp_path / 'coco'
    _coco_folder(root)
    cfg = Config.fromfile(REPO / 'configs/mmdet/mask_rcnn_groupmamba_t.py')
    cfg.val_evaluator.ann_file = str(root / 'annotations' / 'instances_val2017.json')
    cfg.val_dataloader.dataset.metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'))
    # The data's classes named, the heads left at COCO's 80: only the heads are the problem.
    (problem, ) = _coco_class_problems(cfg, 'val_dataloader', 'docs/detection.md')
    assert 'can map predictions to 3 categories' in problem and 'not among its categories' not in problem
    assert 'model.roi_head.bbox_head.num_classes=80, model.roi_head.mask_head.num_classes=80 predict another' in problem
    # Classes and heads agree with the annotation file: nothing to say.
    cfg.model.roi_head.bbox_head.num_classes = cfg.model.roi_head.mask_head.num_classes = 3
    assert _coco_class_problems(cfg, 'val_dataloader', 'docs/detection.md') == []
    # A class the annotation file does not list.
    cfg.val_dataloader.dataset.metainfo = dict(classes=('rectangle', 'ellipse', 'star'))
    (problem, ) = _coco_class_problems(cfg, 'val_dataloader', 'docs/detection.md')
    assert "can map predictions to 2 categories" in problem and "1 of the classes are not among its categories " \
        "('star')" in problem
    # Segmentation's evaluator (IoUMetric) has no such mapping: not checked.
    assert _coco_class_problems(Config(dict(val_evaluator=dict(type='IoUMetric'))), 'val_dataloader', '') == []

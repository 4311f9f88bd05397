"""Mask R-CNN with GroupMamba trains and evaluates through mmengine's Runner and through `mim train mmdet`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmdet.apis import DetInferencer
from mmengine.config import Config
from mmengine.runner import Runner
from pycocotools.coco import COCO

from mmgroupmamba.det import SHAPE_CLASSES, ShapesCocoDataset, generate_shapes_coco
from mmgroupmamba.models import GroupMamba

REPO = Path(__file__).parents[1]
DEMO_CONFIG = REPO / 'configs' / 'mmdet' / 'mask_rcnn_groupmamba_demo_shapes.py'
T_CONFIG = REPO / 'configs' / 'mmdet' / 'mask_rcnn_groupmamba_t.py'


@pytest.mark.parametrize('aspect_ratios, shapes', [
    ((1.0, ), {(128, 128)}),
    ((4 / 3, 0.75, 1.5), {(128, 96), (96, 128), (128, 85)}),  # (width, height), longer side 128
])
def test_generated_annotations_are_coco_instances(tmp_path, aspect_ratios, shapes):
    ann_file = tmp_path / 'annotations' / 'instances_val.json'
    generate_shapes_coco(str(ann_file), str(tmp_path / 'val'), num_images=12, seed=3, aspect_ratios=aspect_ratios)
    coco = COCO(str(ann_file))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert len(coco.getImgIds()) == 12
    images = coco.loadImgs(coco.getImgIds())
    assert {(image['width'], image['height']) for image in images} == shapes
    for image in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))
        pixels = cv2.imread(str(tmp_path / 'val' / image['file_name']))
        assert 1 <= len(anns) <= 4 and pixels.shape == (image['height'], image['width'], 3)
        for ann in anns:
            x, y, w, h = ann['bbox']
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            # Area and box are those of the polygon's raster, as in COCO.
            assert mask.sum() == ann['area'] > 0
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_cache_made_with_other_settings_is_refused(tmp_path):
    split = dict(data_root=str(tmp_path), ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=[])
    first = ShapesCocoDataset(**split, num_images=3, seed=0)
    assert len(first) == 3
    assert len(ShapesCocoDataset(**split, num_images=3, seed=0)) == 3  # read from the cache
    with pytest.raises(ValueError, match='num_images'):
        ShapesCocoDataset(**split, num_images=4, seed=0)
    with pytest.raises(ValueError, match='aspect_ratios'):
        ShapesCocoDataset(**split, num_images=3, seed=0, aspect_ratios=(1.0, 0.75))


def test_runner_trains_evaluates_and_infers_small_groupmamba_mask_rcnn(tmp_path):
    """The demo config with the data shrunk: two iterations, CocoMetric at the end, then DetInferencer."""
    cfg = Config.fromfile(str(DEMO_CONFIG))
    data_root = f'{tmp_path}/shapes/'
    for loader, num_images in ((cfg.train_dataloader, 8), (cfg.val_dataloader, 4), (cfg.test_dataloader, 4)):
        loader.update(batch_size=4, num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=data_root, num_images=num_images)
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = data_root + 'annotations/instances_val.json'
    cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = cfg.default_hooks.checkpoint.interval = 1
    cfg.work_dir = str(tmp_path / 'work_dir')
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
    for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
        assert 0.0 <= runner.message_hub.get_scalar(f'val/coco/{key}').current() <= 1.0, key

    inferencer = DetInferencer(model=cfg, weights=str(tmp_path / 'work_dir' / 'epoch_1.pth'), device='cpu')
    image = tmp_path / 'shapes' / 'val' / '000001.png'
    result = inferencer(str(image), out_dir=str(tmp_path / 'drawn'), return_datasamples=True)
    prediction = result['predictions'][0].pred_instances
    assert len(prediction) > 0 and prediction.masks.shape[1:] == (128, 128)
    assert (tmp_path / 'drawn' / 'vis' / image.name).exists()


def test_mim_train_runs_the_t_recipe(tmp_path):
    """`mim train mmdet` on the unchanged T config, pointed at a tiny COCO-format directory.

    Overridden is only what this machine lacks or cannot afford: the ImageNet checkpoint (a stand-in in the
    official layout, loaded through the config's Pretrained init_cfg), AMP (mmengine's AmpOptimWrapper needs a
    GPU), the data (generated shapes in COCO's layout) and the train image scale (a GroupMamba-T step at
    1333x800 takes minutes on 2 CPU cores). Two iterations, no validation (the Runner test above evaluates).
    """
    checkpoint = tmp_path / 'groupmamba_tiny.pth'
    torch.save({'model': GroupMamba(arch='tiny').state_dict()}, checkpoint)
    data_root = tmp_path / 'coco'
    generate_shapes_coco(str(data_root / 'annotations' / 'instances_train2017.json'), str(data_root / 'train2017'),
                         num_images=4, image_size=64, max_objects=2, min_size=20, max_size=40)
    work_dir = tmp_path / 'work_dir'
    classes = '(' + ','.join(SHAPE_CLASSES) + ')'
    cmd = [
        sys.executable, '-m', 'mim', 'train', 'mmdet', str(T_CONFIG), '--work-dir', str(work_dir), '--cfg-options',
        f'train_dataloader.dataset.data_root={data_root}/', f'train_dataloader.dataset.metainfo.classes={classes}',
        'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
        'train_dataloader.dataset.pipeline.2.scale=(96,96)', f'model.backbone.init_cfg.checkpoint={checkpoint}',
        'optim_wrapper.type=OptimWrapper', 'train_cfg.max_epochs=1', 'val_cfg=None', 'val_dataloader=None',
        'val_evaluator=None'
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ))
    # mmdet's own traceback comes first in stderr, mim's (CalledProcessError) after it.
    assert result.returncode == 0, result.stderr[result.stderr.find('Traceback'):][:6000]
    assert f'GroupMamba: loaded {len(GroupMamba(arch="tiny").state_dict())} backbone tensors from {checkpoint}' \
        in result.stdout
    log = next(work_dir.glob('*/vis_data/scalars.json')).read_text().splitlines()
    records = [json.loads(line) for line in log]
    train = [r for r in records if 'loss' in r]
    assert train and all(math.isfinite(r['loss']) for r in train)
    assert [r['iter'] for r in train] == [2]
    # The recipe reached the optimizer: AdamW's lr, in its linear warm-up from 1e-7 towards 1e-4.
    assert 0 < train[0]['lr'] < 1e-6
    config_dump = next(work_dir.glob('*/vis_data/config.py')).read_text()
    assert "type='GroupMamba'" in config_dump and "arch='tiny'" in config_dump

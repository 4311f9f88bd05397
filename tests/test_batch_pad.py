"""BatchPadToFixedSizes in the CUDA-graph detection config: every training batch padded to one of three sizes."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

CONFIG = Path(__file__).parents[1] / 'configs' / 'mmdet' / 'mask_rcnn_groupmamba_t_cuda_graph.py'


@pytest.fixture(scope='module')
def preprocessor():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(CONFIG))
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    return MODELS.build(cfg.model.data_preprocessor)


def batch(*sizes):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs, samples = [], []
    for h, w in sizes:
        inputs.append(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w)))
        masks = np.zeros((1, h, w), dtype=np.uint8)
        masks[0, :h // 2, :w // 2] = 1
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[0.0, 0.0, w / 2, h / 2]]),
                                           labels=torch.tensor([0]), masks=BitmapMasks(masks, h, w))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('sizes, padded', [
    ([(600, 1000), (640, 900)], (800, 1088)),     # landscape: the smallest listed size that holds 640x1024
    ([(800, 1199), (800, 1066)], (800, 1216)),    # COCO's 640x427 at Mask R-CNN's scale: no extra padding
    ([(750, 1333), (800, 1066)], (800, 1344)),    # wide
    ([(1000, 600), (1333, 750)], (1344, 800)),    # portrait
    ([(800, 1066), (1066, 800)], (1344, 1344)),   # mixed
])
def test_training_batches_are_padded_to_a_listed_size(preprocessor, sizes, padded):
    out = preprocessor(batch(*sizes), training=True)
    assert tuple(out['inputs'].shape) == (2, 3, *padded)
    for sample, (h, w) in zip(out['data_samples'], sizes):
        assert sample.batch_input_shape == padded and sample.img_shape == (h, w)
        masks = sample.gt_instances.masks
        assert (masks.height, masks.width) == padded
        assert masks.masks[0, :h // 2, :w // 2].all() and masks.masks.sum() == (h // 2) * (w // 2)


def test_test_batches_keep_their_size(preprocessor):
    out = preprocessor(batch((600, 1000)), training=False)
    assert tuple(out['inputs'].shape) == (1, 3, 608, 1024)  # padded to multiples of 32 only


def test_a_batch_that_fits_no_size_is_refused(preprocessor):
    with pytest.raises(ValueError, match='1376x800 batch fits none of the sizes'):
        preprocessor(batch((1376, 800)), training=True)

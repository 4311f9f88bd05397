"""UperNet + GroupMamba through stock mmseg: every config parses and builds (the recipe's weight decay per
parameter is checked in test_recipes.py), a short `mim train` / `mim test` (+ `--tta`) run on generated
ADE20K-format data, and inference at odd sizes."""
import inspect
import os.path as osp
import re
import subprocess
import sys
from glob import glob

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.apis import MMSegInferencer
from mmseg.datasets import ADE20KDataset
from mmseg.registry import MODELS

from mmgroupmamba.models import GroupMamba
from mmgroupmamba.seg.demo_data import ADE_IDS, DEMO_CLASSES, make_demo_dataset

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob(osp.join(REPO, 'configs', 'mmseg', '*.py')))
DEMO_CONFIG = osp.join(REPO, 'configs', 'mmseg', 'upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py')
TINY_CONFIG = osp.join(REPO, 'configs', 'mmseg', 'upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py')
SMOKE_ITERS = 4


def _build_model(cfg):
    init_default_scope('mmseg')
    return MODELS.build(cfg.model)


def test_configs_found():
    names = {osp.basename(path) for path in CONFIGS}
    for size in 'tsb':
        assert f'upernet_groupmamba-{size}_8xb2-160k_ade20k-512x512.py' in names
    assert osp.basename(DEMO_CONFIG) in names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_parses_and_builds(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(imports=['mmgroupmamba'], allow_failed_imports=False)
    # Only GroupMamba's own arguments: a key inherited from the Swin base would be a silent bug.
    backbone_args = set(inspect.signature(GroupMamba).parameters)
    assert set(cfg.model.backbone) - {'type'} <= backbone_args, set(cfg.model.backbone) - backbone_args
    assert cfg.model.test_cfg.mode == 'whole'
    assert cfg.tta_model.type == 'SegTTAModel' and cfg.tta_pipeline

    model = _build_model(cfg)
    assert isinstance(model.backbone, GroupMamba)
    dims = model.backbone.embed_dims
    assert list(model.decode_head.in_channels) == list(dims)
    assert model.auxiliary_head.in_channels == dims[model.auxiliary_head.in_index]
    assert model.decode_head.num_classes == len(cfg.train_dataloader.dataset.get('metainfo', {}).get(
        'classes', ADE20KDataset.METAINFO['classes']))


def test_full_configs_follow_the_recipe():
    expected = {'t': ('tiny', 0.2), 's': ('small', 0.3), 'b': ('base', 0.6)}
    for size, (arch, drop_path) in expected.items():
        name = f'upernet_groupmamba-{size}_8xb2-160k_ade20k-512x512.py'
        cfg = Config.fromfile(osp.join(REPO, 'configs', 'mmseg', name))
        backbone = cfg.model.backbone
        assert (backbone.arch, backbone.drop_path_rate) == (arch, drop_path)
        assert backbone.init_cfg.type == 'Pretrained' and arch in backbone.init_cfg.checkpoint
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, poly.type, poly.begin, poly.end) == ('LinearLR', 1500, 'PolyLR', 1500, 160000)
        assert cfg.train_cfg.max_iters == 160000
        # 8 GPUs x 2 images = the protocol's batch of 16.
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)


def test_demo_data_is_ade20k_format(tmp_path):
    counts = make_demo_dataset(str(tmp_path), num_train=3, num_val=2, seed=1)
    assert counts == dict(training=3, validation=2)
    allowed = {0} | set(ADE_IDS.values())
    assert ADE_IDS['sky'] == 3 and ADE_IDS['car'] == 21  # ADE20K's own ids, 1-based
    seen = set()
    for split, count in counts.items():
        images = sorted(glob(str(tmp_path / 'images' / split / '*.jpg')))
        assert len(images) == count
        for image_path in images:
            label_path = image_path.replace('/images/', '/annotations/').replace('.jpg', '.png')
            image, label = cv2.imread(image_path), cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == image.shape[:2]
            values = set(np.unique(label).tolist())
            assert values <= allowed, values - allowed
            seen |= values
    assert {ADE_IDS['sky'], ADE_IDS['building']} <= seen
    with pytest.raises(ValueError, match='num_val=0'):
        make_demo_dataset(str(tmp_path / 'empty'), num_train=1, num_val=0)


def _mim(*args, cwd):
    result = subprocess.run([sys.executable, '-m', 'mim', *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _miou(log):
    values = re.findall(r'mIoU: ([0-9.]+)', log)
    assert values, log[-3000:]
    return float(values[-1])


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """`mim train mmseg` of the demo config for a few iterations on a few generated images."""
    root = tmp_path_factory.mktemp('seg_demo')
    data_root = root / 'ade_demo'
    make_demo_dataset(str(data_root), num_train=8, num_val=2, seed=0)
    work_dir = root / 'work_dir'
    data_options = [f'{loader}.dataset.data_root={data_root}' for loader in
                    ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    log = _mim('train', 'mmseg', DEMO_CONFIG, '--gpus', '0', '--work-dir', str(work_dir), '--cfg-options',
               f'train_cfg.max_iters={SMOKE_ITERS}', f'train_cfg.val_interval={SMOKE_ITERS}',
               'default_hooks.logger.interval=1', f'default_hooks.checkpoint.interval={SMOKE_ITERS}',
               'train_dataloader.batch_size=2', *data_options, cwd=str(root))
    return dict(root=root, work_dir=work_dir, data_options=data_options, train_log=log,
                checkpoint=work_dir / f'iter_{SMOKE_ITERS}.pth')


def test_mim_train_runs_and_validates(demo_run):
    log = demo_run['train_log']
    assert f'Iter(train) [{SMOKE_ITERS}/{SMOKE_ITERS}]' in log
    assert 0.0 <= _miou(log) <= 100.0
    assert demo_run['checkpoint'].is_file()


@pytest.mark.parametrize('tta', [False, True], ids=['single-scale', 'tta'])
def test_mim_test_prints_miou(demo_run, tta):
    work_dir = demo_run['root'] / f'test_tta{int(tta)}'
    args = ['test', 'mmseg', DEMO_CONFIG, '--checkpoint', str(demo_run['checkpoint']), '--work-dir', str(work_dir),
            '--cfg-options', *demo_run['data_options']]
    log = _mim(*args, *(['--tta'] if tta else []), cwd=str(demo_run['root']))
    assert 'Iter(test) [2/2]' in log
    assert 0.0 <= _miou(log) <= 100.0
    # The config the run used, as mmengine dumped it: with --tta, mmseg wrapped the model and swapped the pipeline.
    used = Config.fromfile(str(work_dir / osp.basename(DEMO_CONFIG)))
    assert used.model.type == ('SegTTAModel' if tta else 'EncoderDecoder')
    assert (used.test_dataloader.dataset.pipeline[1].type == 'TestTimeAug') == tta


def test_inferencer_at_odd_image_sizes(demo_run, tmp_path):
    """MMSegInferencer with the demo checkpoint: predictions come back at each input's own (odd) size."""
    inferencer = MMSegInferencer(model=DEMO_CONFIG, weights=str(demo_run['checkpoint']), device='cpu')
    rng = np.random.default_rng(0)
    for height, width in [(375, 500), (97, 131)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pred = inferencer(image, return_datasamples=True).pred_sem_seg.data
        assert tuple(pred.shape[-2:]) == (height, width)
        assert int(pred.max()) < len(DEMO_CLASSES)


@pytest.mark.parametrize('size', [(375, 500), (97, 131), (64, 64)])
def test_whole_image_inference_without_resizing(size):
    """The network itself runs at sizes that are not multiples of 32 (no test-time resize or padding)."""
    model = _build_model(Config.fromfile(DEMO_CONFIG)).eval()
    inputs = torch.randn(1, 3, *size)
    with torch.no_grad():
        features = model.extract_feat(inputs)
        results = model.predict(inputs)
    assert [f.shape[-2:] for f in features] == [
        torch.Size([-(-size[0] // 2**k), -(-size[1] // 2**k)]) for k in (2, 3, 4, 5)]
    assert tuple(results[0].pred_sem_seg.data.shape[-2:]) == size
    assert results[0].seg_logits.data.shape[0] == len(DEMO_CLASSES)

"""mmengine checkpoints under torch's weights_only=True, through a real Runner."""
import argparse
import contextlib
import functools
import http.server
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401  (registers the safe loading, as custom_imports does)
from mmgroupmamba import GroupMamba
from mmgroupmamba.checkpoint import OFFICIAL_WEIGHTS, TRUST_COMMAND, InvalidCheckpointError
from mmgroupmamba.trust_checkpoint import main as trust_cli

SMALL_ARCH = dict(stem_hidden_dim=8, embed_dims=[16, 16, 16, 16], mlp_ratios=[1, 1, 1, 1], depths=[1, 1, 1, 1])


class TinyRegressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.backbone = GroupMamba(arch=SMALL_ARCH, out_indices=(3,))
        self.head = nn.Linear(16, 1)

    def forward(self, inputs, targets, mode='loss'):
        pred = self.head(self.backbone(torch.stack(inputs))[0].mean((2, 3))).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((pred - torch.stack(targets)) ** 2).mean())
        return pred


class RandomImages(Dataset):
    metainfo = dict(classes=('a', 'b'), palette=[(0, 0, 0), (255, 0, 0)])

    def __len__(self):
        return 4

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(3, 32, 32, generator=gen), targets=torch.tensor(float(index)))


def make_runner(work_dir, max_epochs, resume=False):
    return Runner(
        model=TinyRegressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=RandomImages(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2),
                         dict(type='MultiStepLR', milestones=[1], by_epoch=True)],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1), logger=dict(type='LoggerHook',
                                                                                       interval=1)),
        randomness=dict(seed=0),
        resume=resume,
        load_from=None,
    )


def test_runner_checkpoint_resumes_under_weights_only(tmp_path):
    make_runner(tmp_path, max_epochs=1).train()
    checkpoint = tmp_path / 'epoch_1.pth'
    # The file needs more than tensors: torch's safe loading alone (no plugin imported) refuses it ...
    plain = subprocess.run([sys.executable, '-c', f'import torch; torch.load({str(checkpoint)!r})'],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and 'HistoryBuffer' in plain.stderr
    # ... and with the plugin's allow-list it loads with weights_only=True.
    loaded = torch.load(checkpoint, weights_only=True)
    assert loaded['meta']['epoch'] == 1
    runner = make_runner(tmp_path, max_epochs=2, resume=True)
    runner.train()
    assert runner.epoch == 2 and runner.iter == 4
    assert (tmp_path / 'epoch_2.pth').exists()


def test_foreign_pickle_is_refused_with_the_opt_in(tmp_path):
    path = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    assert 'argparse.Namespace' in message and TRUST_COMMAND in message


def test_getattr_is_only_allowed_for_history_buffer_statistics(tmp_path):
    # A pickle calling getattr on anything but HistoryBuffer's statistics must not load.
    path = tmp_path / 'sneaky.pth'
    torch.save({'x': GetattrCall(HistoryBuffer, 'register_statistics')}, path)
    with pytest.raises(pickle.UnpicklingError, match='register_statistics'):
        torch.load(path, weights_only=True)
    torch.save({'x': GetattrCall(HistoryBuffer, 'mean')}, path)
    assert torch.load(path, weights_only=True)['x'] is HistoryBuffer.mean


class GetattrCall:
    """Pickles as a call of getattr(owner, name)."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_trust_command_resaves_as_plain_data(tmp_path, capsys):
    src, dst = tmp_path / 'trusted.pth', tmp_path / 'plain.pth'
    torch.save({'model': {'w': torch.arange(3.0)}, 'config': argparse.Namespace(lr=0.1), 'epoch': 5}, src)
    trust_cli([str(src), str(dst)])
    assert 'config (argparse.Namespace)' in capsys.readouterr().out
    loaded = CheckpointLoader.load_checkpoint(str(dst))
    assert set(loaded) == {'model', 'epoch'} and torch.equal(loaded['model']['w'], torch.arange(3.0))


# ---------------------------------------------------------------------------------------------------------------
# Damaged and foreign files (issue #17, item 3): the error names the file and says what is wrong with it.

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden'


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN / 'golden_mini_seed0.pt', weights_only=True)


def save_like_the_release(state_dict, path):
    """What the released files hold: the EMA classifier's state dict itself, an OrderedDict of tensors.

    HuggingFace's pickle scan of groupmamba_tiny_ema.pth and groupmamba_small_ema.pth lists exactly the imports
    collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.FloatStorage and torch.LongStorage; the
    official eval.py loads the file with ``model.load_state_dict(checkpoint)``.
    """
    torch.save(OrderedDict(state_dict), path)


def record_offset(path, suffix):
    """Byte offset in the file of the data of the zip record whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack('<HH', header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def flip_bit(path, offset, bit=7):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('where', ['pickle', 'tensor'])
def test_bit_flipped_checkpoint_is_reported_as_damaged(golden, tmp_path, where):
    path = tmp_path / 'groupmamba_mini_ema.pth'
    save_like_the_release(golden['state_dict'], path)
    if where == 'pickle':
        # The high bit of a key's first letter: torch alone fails with a UnicodeDecodeError naming no file.
        pickle_start = record_offset(path, '/data.pkl')
        key_at = path.read_bytes().index(b'patch_embed1', pickle_start)
        flip_bit(path, key_at)
    else:
        # A bit in the middle of a tensor: torch alone loads the file and returns a wrong weight.
        flip_bit(path, record_offset(path, '/data/0') + 5)
    with pytest.raises(InvalidCheckpointError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message and 'is not a valid checkpoint' in message, message
    assert 'damaged' in message and 'download or copy it again' in message, message


@pytest.mark.parametrize('content, explanation', [
    (b'epoch 12, box AP 47.6\n', 'neither a zip archive'),
    (b'version https://git-lfs.github.com/spec/v1\noid sha256:4c8e15f2\nsize 93888215\n', 'Git LFS pointer'),
    (b'<!DOCTYPE html>\n<html><body>GroupMamba-Tiny</body></html>\n', 'HTML page'),
])
def test_file_that_is_no_checkpoint_is_named(tmp_path, content, explanation):
    path = tmp_path / 'groupmamba_tiny.pth'
    path.write_bytes(content)
    with pytest.raises(InvalidCheckpointError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    assert f'{path} is not a checkpoint' in message and explanation in message, message


class RunsACommand:
    """Pickles as a call of os.system, the classic malicious checkpoint."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_refused_pickle_says_what_was_refused(tmp_path):
    path = tmp_path / 'malicious.pth'
    marker = tmp_path / 'it_ran'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': RunsACommand(f'touch {marker}')}, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    # torch's own reason is kept: the global it refused.
    assert str(path) in message and f'GLOBAL {os.system.__module__}.system' in message, message
    assert TRUST_COMMAND in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# The released weights in one step (issue #17, item 2).

def test_release_holds_only_types_torch_loads_safely(golden, tmp_path):
    """The imitation pickles exactly the globals HuggingFace lists for the released files, and they load under
    torch's weights_only=True with nothing allow-listed: no conversion, no extra allow-list entry needed."""
    path = tmp_path / 'groupmamba_mini_ema.pth'
    save_like_the_release(golden['state_dict'], path)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith('/data.pkl')))
    globals_ = {arg.replace(' ', '.') for op, arg, _ in pickletools.genops(pickled) if op.name == 'GLOBAL'}
    assert globals_ == {'collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch.FloatStorage',
                        'torch.LongStorage'}
    plain = subprocess.run([sys.executable, '-c', f'import torch; torch.load({str(path)!r}, weights_only=True)'],
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr


@contextlib.contextmanager
def http_server(directory):
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


def test_release_url_in_init_cfg_loads_in_one_step(golden, tmp_path, monkeypatch):
    """init_cfg pointing at the release's URL: downloaded once into torch's hub cache, loaded safely."""
    served = tmp_path / 'served'
    served.mkdir()
    save_like_the_release(golden['state_dict'], served / 'groupmamba_mini_ema.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with http_server(served) as address:
        url = f'{address}/groupmamba_mini_ema.pth'
        model = GroupMamba(arch=golden['arch_cfg'], init_cfg=dict(type='Pretrained', checkpoint=url))
        model.init_weights()
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'groupmamba_mini_ema.pth').is_file()
    model.eval()
    with torch.no_grad():
        outs = model(golden['input'])
    for out, expected in zip(outs, golden['stage_outputs']):
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_url_checkpoint_is_loaded_safely(tmp_path, monkeypatch):
    """mmengine's own URL loader unpickles downloads with weights_only=False; the plugin's refuses code."""
    served = tmp_path / 'served'
    served.mkdir()
    marker = tmp_path / 'it_ran'
    torch.save({'state_dict': {}, 'x': RunsACommand(f'touch {marker}')}, served / 'malicious.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with http_server(served) as address, pytest.raises(pickle.UnpicklingError, match='malicious.pth'):
        CheckpointLoader.load_checkpoint(f'{address}/malicious.pth')
    assert not marker.exists()


def test_url_that_cannot_be_downloaded_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with http_server(tmp_path) as address:
        url = f'{address}/groupmamba_tiny_ema.pth'  # nothing served there: HTTP 404
        with pytest.raises(OSError) as info:
            CheckpointLoader.load_checkpoint(url)
    message = str(info.value)
    assert f'Could not download {url}' in message and '404' in message, message
    assert 'local path' in message


def test_configs_point_at_the_official_weights():
    from mmengine.config import Config
    repo = Path(__file__).resolve().parents[1]
    configs = {
        'tiny': ['mmdet/mask_rcnn_groupmamba_t.py', 'mmdet/mask_rcnn_groupmamba_t_ms_3x.py',
                 'mmseg/upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'],
        'small': ['mmdet/mask_rcnn_groupmamba_s.py', 'mmdet/mask_rcnn_groupmamba_s_ms_3x.py',
                  'mmseg/upernet_groupmamba-s_8xb2-160k_ade20k-512x512.py'],
        'base': ['mmdet/mask_rcnn_groupmamba_b.py', 'mmdet/mask_rcnn_groupmamba_b_ms_3x.py',
                 'mmseg/upernet_groupmamba-b_8xb2-160k_ade20k-512x512.py'],
    }
    for arch, names in configs.items():
        for name in names:
            backbone = Config.fromfile(str(repo / 'configs' / name)).model.backbone
            assert backbone.arch == arch, name
            assert backbone.init_cfg.checkpoint == OFFICIAL_WEIGHTS[arch], name


def test_missing_backbone_checkpoint_says_where_the_official_weights_are(tmp_path):
    path = tmp_path / 'checkpoints' / 'groupmamba_tiny.pth'
    model = GroupMamba(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(FileNotFoundError) as info:
        model.init_weights()
    message = str(info.value)
    assert f'{path} can not be found' in message and OFFICIAL_WEIGHTS['tiny'] in message, message


# ---------------------------------------------------------------------------------------------------------------
# The trust command runs without runpy's warning (issue #17, item 4).

def test_trust_command_runs_without_a_warning(tmp_path):
    src, dst = tmp_path / 'trusted.pth', tmp_path / 'plain.pth'
    torch.save({'model': {'w': torch.arange(3.0)}, 'config': argparse.Namespace(lr=0.1)}, src)
    result = subprocess.run([sys.executable, '-m', 'mmgroupmamba.trust_checkpoint', str(src), str(dst)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    assert f'saved {dst}' in result.stdout
    assert TRUST_COMMAND == 'python -m mmgroupmamba.trust_checkpoint SRC DST'

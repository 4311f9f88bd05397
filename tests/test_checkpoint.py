"""mmengine checkpoints under torch's weights_only=True, through a real Runner."""
import argparse
import pickle
import subprocess
import sys

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
from mmgroupmamba.checkpoint import TRUST_COMMAND, main as checkpoint_cli

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
    checkpoint_cli(['trust', str(src), str(dst)])
    assert 'config (argparse.Namespace)' in capsys.readouterr().out
    loaded = CheckpointLoader.load_checkpoint(str(dst))
    assert set(loaded) == {'model', 'epoch'} and torch.equal(loaded['model']['w'], torch.arange(3.0))

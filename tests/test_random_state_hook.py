"""RandomStateHook on its own: the stored form, a user's config (epoch-based, a worker, no seed set), and the
warnings where a resume cannot be exact. A small model through mmengine's Runner, a second per run."""
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dist import get_rank
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from torch.utils.data import Dataset

import mmgroupmamba  # noqa: F401  (registers the hook and the safe loading, as custom_imports does)
from mmgroupmamba.checkpoint import load_local_checkpoint
from mmgroupmamba.hooks import CHECKPOINT_KEY, capture_random_states, restore_random_states

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from resume_check import Difference, InterruptAfter, Interrupted, compare, report  # noqa: E402


class NoisyRegressor(BaseModel):
    """Draws in the main process like the real models: dropout (torch) and a Mixup-like factor (numpy)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 1)
        with torch.no_grad():  # built before the Runner seeds the generators: start from fixed weights
            self.layer.weight.copy_(torch.linspace(-0.5, 0.5, 8))
            self.layer.bias.zero_()

    def forward(self, inputs, targets, mode='loss'):
        x = F.dropout(torch.stack(inputs), 0.3, training=self.training)
        if self.training:  # a draw per rank: in distributed runs the ranks' streams part ways
            x = x + torch.rand(get_rank() + 1).mean()
        pred = self.layer(x * (1 + np.random.rand())).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((pred - torch.stack(targets)) ** 2).mean())
        return pred


class AugmentedPoints(Dataset):
    """Augmentation drawn from all three generators, in the dataloader's worker (or the main process)."""
    metainfo = dict(classes=('point', ))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        noise = torch.rand(8) + np.random.rand() + random.random()
        return dict(inputs=torch.arange(8.0) * (index + 1) / 8 + noise, targets=torch.tensor(float(index)))


def train(work_dir, name, *, seed=0, max_epochs=4, interrupt=None, resume_from=None, num_workers=0,
          persistent_workers=False, with_hook=True, checkpoint=None):
    runner = Runner(
        model=NoisyRegressor(),
        work_dir=str(work_dir),
        experiment_name=f'{name}_{abs(hash(str(work_dir)))}',
        train_dataloader=dict(dataset=AugmentedPoints(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=num_workers, persistent_workers=persistent_workers),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', **(checkpoint or dict(interval=1))),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='RandomStateHook')] if with_hook else [],
        randomness=dict(seed=seed),
        resume=resume_from is not None,
        load_from=None if resume_from is None else str(resume_from))
    if interrupt is not None:
        runner.register_hook(InterruptAfter(*interrupt))
    try:
        runner.train()
    except Interrupted:
        pass
    last = (Path(work_dir) / 'last_checkpoint').read_text().strip()
    log = next(Path(runner.log_dir).glob('*.log')).read_text()
    return dict(log_dir=runner.log_dir, checkpoint=last, seed=runner.seed, log=log)


def test_stored_states_restore_the_draws_and_are_plain_data(tmp_path):
    np.random.randn()  # numpy's and Python's Gaussian samplers cache a second value: store that too
    random.gauss(0, 1)
    states = capture_random_states()

    def draws():
        return (torch.rand(4), torch.randn(2), np.random.rand(3), np.random.randn(), random.random(),
                random.gauss(0, 1))

    first = draws()
    restore_random_states(states)
    second = draws()
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    path = tmp_path / 'states.pth'
    torch.save({CHECKPOINT_KEY: states}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    # Loads in a process that has not imported the plugin (no allow-list at all), with weights_only=True.
    code = f'import torch; s = torch.load({str(path)!r}, weights_only=True)["{CHECKPOINT_KEY}"]; print(sorted(s))'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['numpy',", "'python',", "'torch']"]


def test_user_config_resumes_exactly_with_a_worker_and_no_seed_set(tmp_path):
    """Any config with the hook in custom_hooks: epoch-based, a worker drawing the augmentation (not persistent),
    randomness.seed unset in the interrupted and the resumed run (each draws its own)."""
    options = dict(num_workers=1, seed=None)
    interrupted = train(tmp_path / 'interrupted', 'interrupted', interrupt=(2, True), **options)
    full = train(tmp_path / 'full', 'full', **dict(options, seed=interrupted['seed']))
    # Resuming loads the checkpoint through the plugin's loader, under torch's safe loading.
    assert CheckpointLoader._get_checkpoint_loader(interrupted['checkpoint']) is load_local_checkpoint
    resumed = train(tmp_path / 'resumed', 'resumed', resume_from=interrupted['checkpoint'], **options)
    differences = compare(full, resumed, after_iter=8)
    assert all(d.identical and d.leaves for d in differences.values()), report(differences, 'resumed vs full')
    assert 'logged loss' in differences and 'random states' in differences
    assert 'set back: sampler seed' in resumed['log'] and 'restored the random states of iteration 8' in resumed['log']
    assert 'WARNING' not in ''.join(line for line in resumed['log'].splitlines() if 'RandomStateHook:' in line)

    # The same without the hook drifts: the comparison above can fail.
    interrupted = train(tmp_path / 'interrupted_plain', 'interrupted_plain', interrupt=(2, True), with_hook=False)
    full = train(tmp_path / 'full_plain', 'full_plain', with_hook=False)
    resumed = train(tmp_path / 'resumed_plain', 'resumed_plain', resume_from=interrupted['checkpoint'],
                    with_hook=False)
    assert not compare(full, resumed, after_iter=8)['model state'].identical


def test_warnings_where_a_resume_cannot_be_exact(tmp_path):
    # Persistent workers in an epoch-based loop, and a checkpoint written inside an epoch (iteration 3 of 4).
    interrupted = train(tmp_path / 'a', 'a', interrupt=(3, False), num_workers=1, persistent_workers=True,
                        checkpoint=dict(interval=3, by_epoch=False))
    resumed = train(tmp_path / 'a_resumed', 'a_resumed', resume_from=interrupted['checkpoint'], num_workers=1,
                    persistent_workers=True, max_epochs=1)
    assert 'workers are persistent' in resumed['log'] and 'persistent_workers=False' in resumed['log']
    assert 'saved inside epoch 1 (iteration 3)' in resumed['log']

    # A checkpoint written without the hook.
    plain = train(tmp_path / 'b', 'b', interrupt=(1, True), with_hook=False)
    resumed = train(tmp_path / 'b_resumed', 'b_resumed', resume_from=plain['checkpoint'], max_epochs=2)
    assert 'holds no random states' in resumed['log'] and 'restored the random states' not in resumed['log']

    # Another number of ranks than the checkpoint's: nothing is restored, and the log says so.
    checkpoint = torch.load(interrupted['checkpoint'], weights_only=True)
    stored = checkpoint[CHECKPOINT_KEY]
    assert stored['world_size'] == 1 and len(stored['ranks']) == 1
    checkpoint[CHECKPOINT_KEY] = dict(stored, world_size=2, ranks=stored['ranks'] * 2)
    two_ranks = tmp_path / 'two_ranks.pth'
    torch.save(checkpoint, two_ranks)
    resumed = train(tmp_path / 'c_resumed', 'c_resumed', resume_from=two_ranks, max_epochs=1)
    assert 'random states of 2 ranks and this run has 1' in resumed['log']
    assert 'restored the random states' not in resumed['log']


def test_load_from_without_resume_restores_nothing(tmp_path):
    first = train(tmp_path / 'first', 'first', max_epochs=1)
    runner = Runner(
        model=NoisyRegressor(), work_dir=str(tmp_path / 'finetune'), experiment_name=f'finetune_{id(tmp_path)}',
        train_dataloader=dict(dataset=AugmentedPoints(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)), train_cfg=dict(by_epoch=True, max_epochs=1),
        custom_hooks=[dict(type='RandomStateHook')], randomness=dict(seed=0), load_from=first['checkpoint'])
    runner.train()
    log = next(Path(runner.log_dir).glob('*.log')).read_text()
    assert 'Load checkpoint from' in log and 'RandomStateHook:' not in log


def _distributed_stage(rank, port, work_dir, stage, resume_from):
    """One rank of a 2-process run: gloo on the CPU, the process group set up here (mmengine's 'pytorch'
    launcher needs CUDA), each rank with its own shard of the data and its own random draws."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        result = train(work_dir / stage, stage, interrupt=(2, True) if stage == 'interrupted' else None,
                       resume_from=resume_from)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (work_dir / f'{stage}.txt').write_text(result['checkpoint'])


def test_distributed_ranks_resume_their_own_states(tmp_path):
    checkpoints = {}
    for stage in ('interrupted', 'full', 'resumed'):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        resume_from = checkpoints['interrupted'] if stage == 'resumed' else None
        mp.start_processes(_distributed_stage, args=(port, tmp_path, stage, resume_from), nprocs=2,
                           start_method='fork')
        checkpoints[stage] = (tmp_path / f'{stage}.txt').read_text()
    full, resumed = (torch.load(checkpoints[k], weights_only=True) for k in ('full', 'resumed'))
    ranks = full[CHECKPOINT_KEY]['ranks']
    assert full[CHECKPOINT_KEY]['world_size'] == len(ranks) == 2
    # The ranks drew differently, so restoring one rank's states on the other would show.
    assert not torch.equal(ranks[0]['generators']['torch'], ranks[1]['generators']['torch'])
    for key in ('state_dict', 'optimizer', CHECKPOINT_KEY):
        difference = Difference()
        difference.add(full[key], resumed[key], key)
        assert difference.identical, (key, difference.first)

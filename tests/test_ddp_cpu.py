"""Distributed data-parallel training of the demo configs in 2 CPU processes (gloo, loopback), started as
``--launcher pytorch`` starts them: ``python -m torch.distributed.run --nproc_per_node 2`` with ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, running ``mmgroupmamba.cpu_ddp`` (mmengine's Runner
with ``launcher='pytorch'``; see its docstring for why mmengine's own launcher cannot start without CUDA).

Each rank records what it trained on and where it ended (``ddp_record_hook.RecordRankHook``); the tests check
that the ranks trained on different images, every loss is finite, and afterwards every parameter and the
AdamW state are bitwise equal on both ranks, with the merged optimizer param groups of the configs. SyncBN
cannot run on CPU tensors; the entry refuses it with the config keys to change, tested at the end.
"""
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from mmgroupmamba.cpu_ddp import main as cpu_ddp_main
from mmgroupmamba.cpu_ddp import sync_bn_keys
from mmgroupmamba.seg.demo_data import make_demo_dataset

REPO = Path(__file__).parents[1]
TESTS = Path(__file__).parent
DET_DEMO = REPO / 'configs' / 'mmdet' / 'mask_rcnn_groupmamba_demo_shapes.py'
SEG_DEMO = REPO / 'configs' / 'mmseg' / 'upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py'
SEG_T = REPO / 'configs' / 'mmseg' / 'upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'
WORLD_SIZE = 2
BATCH_PER_RANK = 2
ITERS = 3
TIMEOUT_S = 300
# The stem's BatchNorm layers (conv, BN, GELU, ... in GroupMamba's ConvStem) and what each one keeps per rank.
STEM_BN = [f'backbone.patch_embed1.conv.{i}' for i in (1, 4, 7)]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _record_config(tmp_path, base, imports):
    """A config inheriting ``base`` that adds the recording hook; its records go to ``tmp_path/records``."""
    path = tmp_path / 'ddp_config.py'
    path.write_text(f'_base_ = {str(base)!r}\n'
                    f'custom_imports = dict(imports={imports + ["ddp_record_hook"]!r}, allow_failed_imports=False)\n'
                    f'custom_hooks = [dict(type="RecordRankHook", out_dir={str(tmp_path / "records")!r})]\n')
    return path


def _torchrun(config, work_dir, cfg_options, cwd):
    """``python -m torch.distributed.run --nproc_per_node 2 -m mmgroupmamba.cpu_ddp ...`` on 127.0.0.1."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(WORLD_SIZE), '--master_addr',
           '127.0.0.1', '--master_port', str(_free_port()), '-m', 'mmgroupmamba.cpu_ddp', str(config), '--work-dir',
           str(work_dir), '--cfg-options', *cfg_options]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get('PYTHONPATH', '')]),
               GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    # Its own session, so that a hang kills the launcher and both workers.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f'2-process training did not finish in {TIMEOUT_S} s:\n{output[-6000:]}')
    assert proc.returncode == 0, output[-6000:]
    return output


def _load_records(tmp_path):
    records = [torch.load(tmp_path / 'records' / f'rank{rank}.pt', weights_only=False) for rank in range(WORLD_SIZE)]
    assert [(r['rank'], r['world_size'], r['wrapper']) for r in records] == [
        (rank, WORLD_SIZE, 'MMDistributedDataParallel') for rank in range(WORLD_SIZE)]
    return records


def _check_ranks_agree(records):
    """The ranks trained on different images with finite losses, and ended with the same parameters and AdamW
    state, in the merged param groups. Returns the state-dict keys that differ between the ranks."""
    rank0, rank1 = records
    for record in records:
        assert len(record['iterations']) == ITERS
        for iteration in record['iterations']:
            assert 'loss' in iteration['losses'], iteration['losses']
            assert all(math.isfinite(value) for value in iteration['losses'].values()), iteration['losses']
            assert len(iteration['images']) == BATCH_PER_RANK
    for it0, it1 in zip(rank0['iterations'], rank1['iterations']):
        assert not set(it0['images']) & set(it1['images']), (it0['images'], it1['images'])

    # DDP started both ranks from rank 0's weights, and every step changed every trainable parameter.
    assert rank0['initial'].keys() == rank1['initial'].keys()
    for name in rank0['initial']:
        assert torch.equal(rank0['initial'][name], rank1['initial'][name]), name
    assert rank0['trainable'] == rank1['trainable'] and rank0['trainable']
    # A parameter may get no gradient at all: the channel affinity's bottleneck (fc1 -> ReLU, 2 units in the
    # small arch) is dead for every image when both units are negative at init, and then fc1 gets zero
    # gradients. Everything else must have moved.
    unchanged = [name for name in rank0['trainable'] if torch.equal(rank0['initial'][name], rank0['final'][name])]
    assert all('.attn.fc1.' in name for name in unchanged), unchanged
    # After the steps the parameters are bitwise equal on both ranks: the gradients were averaged.
    for name in rank0['trainable']:
        assert torch.equal(rank0['final'][name], rank1['final'][name]), name

    # The merged param groups: the same on both ranks, every trainable parameter in exactly one, no two groups
    # with equal settings (mmengine's default constructor gives each parameter its own group).
    assert rank0['param_groups'] == rank1['param_groups']
    grouped = [name for group in rank0['param_groups'] for name in group['params']]
    assert sorted(grouped) == sorted(rank0['trainable'])
    settings = [{k: v for k, v in group.items() if k != 'params'} for group in rank0['param_groups']]
    assert all(a != b for i, a in enumerate(settings) for b in settings[i + 1:]), settings
    assert len(settings) < len(grouped)
    # AdamW's moments and step counts, equal bitwise.
    state0, state1 = rank0['optimizer_state'], rank1['optimizer_state']
    assert state0.keys() == state1.keys() and len(state0) == len(grouped)
    for index in state0:
        for key in state0[index]:
            assert torch.equal(state0[index][key], state1[index][key]), (grouped[index], key)

    assert rank0['final'].keys() == rank1['final'].keys()
    return {name for name in rank0['final'] if not torch.equal(rank0['final'][name], rank1['final'][name])}


def _constructor(config):
    return Config.fromfile(str(config)).optim_wrapper.constructor


def _is_running_stat(name):
    return name.rsplit('.', 1)[-1] in ('running_mean', 'running_var')


def test_mask_rcnn_demo_trains_in_two_processes(tmp_path):
    """The detection demo: 12 generated images (rank 0 generates them, rank 1 waits), 2 per rank and iteration,
    one epoch of 3 iterations, then a distributed CocoMetric validation on 4 images."""
    data_root = f'{tmp_path}/shapes/'
    config = _record_config(tmp_path, DET_DEMO, ['mmgroupmamba', 'mmgroupmamba.det'])
    output = _torchrun(config, tmp_path / 'work_dir', [
        f'train_dataloader.batch_size={BATCH_PER_RANK}', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False', f'train_dataloader.dataset.data_root={data_root}',
        f'train_dataloader.dataset.num_images={ITERS * WORLD_SIZE * BATCH_PER_RANK}',
        'val_dataloader.batch_size=2', 'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
        f'val_dataloader.dataset.data_root={data_root}', 'val_dataloader.dataset.num_images=4',
        f'val_evaluator.ann_file={data_root}annotations/instances_val.json',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', 'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1'], cwd=tmp_path)
    assert 'Distributed training: True' in output
    records = _load_records(tmp_path)
    assert _constructor(DET_DEMO) == 'MergedGroupsOptimWrapperConstructor'
    differing = _check_ranks_agree(records)
    # One epoch: the ranks' shards together are the whole set, each image once.
    images = [image for record in records for iteration in record['iterations'] for image in iteration['images']]
    assert len(set(images)) == len(images) == ITERS * WORLD_SIZE * BATCH_PER_RANK
    # Only the stem's BatchNorm statistics are per rank (mmengine's DDP does not broadcast buffers).
    assert differing and all(_is_running_stat(name) for name in differing), differing
    assert {name.rsplit('.', 1)[0] for name in differing} == set(STEM_BN)
    # The validation gathered both ranks' predictions into one CocoMetric.
    assert 'Epoch(val) [1][1/1]' in output and 'coco/bbox_mAP:' in output and 'coco/segm_mAP:' in output
    assert (tmp_path / 'work_dir' / 'epoch_1.pth').is_file()


def test_upernet_demo_trains_in_two_processes(tmp_path):
    """The segmentation demo, as configured (BN in the stem and heads: SyncBN cannot run on CPU, see below):
    3 iterations of 2 crops per rank."""
    data_root = tmp_path / 'ade_demo'
    make_demo_dataset(str(data_root), num_train=8, num_val=1, seed=0)
    config = _record_config(tmp_path, SEG_DEMO, ['mmgroupmamba'])
    output = _torchrun(config, tmp_path / 'work_dir', [
        f'train_dataloader.batch_size={BATCH_PER_RANK}', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False', f'train_dataloader.dataset.data_root={data_root}',
        f'train_cfg.max_iters={ITERS}', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        f'default_hooks.checkpoint.interval={ITERS}', 'default_hooks.logger.interval=1'], cwd=tmp_path)
    assert 'Distributed training: True' in output
    assert _constructor(SEG_DEMO) == 'MergedGroupsOptimWrapperConstructor'
    differing = _check_ranks_agree(_load_records(tmp_path))
    # Per rank: the running statistics of the stem's BatchNorm and of the heads' (all BN in the demo).
    assert all(_is_running_stat(name) for name in differing), differing
    assert set(STEM_BN) <= {name.rsplit('.', 1)[0] for name in differing}
    assert any(name.startswith('decode_head.') for name in differing)
    assert (tmp_path / 'work_dir' / f'iter_{ITERS}.pth').is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason='what mmengine does without CUDA')
def test_mmengine_launcher_needs_cuda(tmp_path, monkeypatch):
    """Why the entry exists: mmengine's ``--launcher pytorch`` path cannot run CPU processes. Its init_dist sets a
    CUDA device even for gloo, and the device_ids it gives DistributedDataParallel are refused for a CPU module.
    Should an mmengine or torch release change that, this test says so."""
    from mmengine.dist import init_dist
    from mmengine.model import MMDistributedDataParallel
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        with pytest.raises(RuntimeError, match='NVIDIA driver'):
            init_dist('pytorch', backend='gloo')
    finally:  # init_dist sets 'spawn' for the whole process when no start method was set
        multiprocessing.set_start_method(start_method, force=True)
    assert not torch_dist.is_initialized()

    torch_dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match='device_ids and output_device arguments only work with'):
            MMDistributedDataParallel(module=torch.nn.Linear(2, 2), device_ids=[0], broadcast_buffers=False)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize('norm_type', ['SyncBN', 'MMSyncBN'])
def test_sync_bn_cannot_run_on_cpu_tensors(tmp_path, norm_type):
    """Why the entry refuses SyncBN: in a process group (here of one gloo process), torch's SyncBatchNorm refuses
    CPU tensors and mmcv's has no CPU kernel. Should a torch or mmcv release change that, this test says so."""
    from mmcv.cnn import build_norm_layer
    torch_dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        layer = build_norm_layer(dict(type=norm_type), 4)[1].train()  # mmcv's needs the process group
        with pytest.raises((ValueError, RuntimeError), match='expected input tensor to be on GPU|for device cpu'):
            layer(torch.randn(2, 4, 3, 3))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize('config, options, keys', [
    (SEG_DEMO, ['model.backbone.norm_cfg.type=SyncBN'], ['model.backbone.norm_cfg']),
    (SEG_DEMO, ['model.backbone.norm_cfg.type=MMSyncBN'], ['model.backbone.norm_cfg']),
    (SEG_T, [], ['model.backbone.norm_cfg', 'model.decode_head.norm_cfg', 'model.auxiliary_head.norm_cfg']),
    (DET_DEMO, ['sync_bn=torch'], ['sync_bn']),
], ids=['seg-demo-stem-syncbn', 'seg-demo-stem-mmsyncbn', 'seg-t', 'det-demo-sync_bn'])
def test_sync_bn_is_refused_with_the_keys_to_change(config, options, keys):
    """The entry refuses a SyncBN config before any process joins, naming each key and the --cfg-options fix."""
    argv = [str(config), '--cfg-options', *options] if options else [str(config)]
    fixes = ' '.join('sync_bn=None' if key == 'sync_bn' else f'{key}.type=BN' for key in keys)
    with pytest.raises(ValueError, match=r'^SyncBN needs CUDA') as error:
        cpu_ddp_main(argv)
    message = str(error.value)
    assert f'the config asks for it in: {", ".join(keys)}.' in message
    assert f'--cfg-options {fixes} ' in message
    # The fix it names makes the config acceptable.
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(dict(option.split('=', 1) for option in options))
    cfg.merge_from_dict({key: None if key == 'sync_bn' else dict(type='BN') for key in keys})
    assert sync_bn_keys(cfg) == []


def test_entry_needs_the_launcher_environment(monkeypatch):
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; start '
                                           'it with python -m torch.distributed.run'):
        cpu_ddp_main([str(SEG_DEMO)])
    assert not torch_dist.is_initialized()

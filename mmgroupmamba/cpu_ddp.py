"""Distributed data-parallel training on CPU processes (gloo): mmengine's Runner, launched like ``--launcher pytorch``.

mmengine 0.10.7's ``--launcher pytorch`` cannot start without CUDA: ``init_dist`` calls
``torch.cuda.set_device(LOCAL_RANK)``, and ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to
``DistributedDataParallel``, which refuses device ids for a CPU module. This entry does those two steps the CPU
way and everything else as ``tools/train.py`` of mmdet / mmseg does (config, ``--cfg-options``, ``--work-dir``,
``Runner.from_cfg(cfg).train()`` with ``launcher='pytorch'``)::

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 \\
        -m mmgroupmamba.cpu_ddp CONFIG [--work-dir DIR] [--cfg-options KEY=VALUE ...]

``torch.distributed.run`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` as it
does for ``--launcher pytorch``; each process joins a gloo process group through them, and the Runner wraps the
model in ``MMDistributedDataParallel`` (``broadcast_buffers=False`` as mmengine's default, ``device_ids=None``).

SyncBN needs CUDA: torch's ``SyncBatchNorm`` refuses CPU tensors once a process group exists, and mmcv's
``MMSyncBN`` is CUDA-only. A config that asks for either (any ``norm_cfg`` under ``model``, or ``sync_bn``) is
refused before the processes join, with an error that names every such key and the ``--cfg-options`` that sets
it to ``BN``. mmengine itself reverts SyncBN to BN only when it does not train distributed.
"""
import argparse
import os
import os.path as osp
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, DictAction
from mmengine.registry import MODEL_WRAPPERS, MODELS
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel

LAUNCH_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _sync_bn_classes():
    import mmcv.cnn  # noqa: F401  registers 'SyncBN' (torch's) and, with mmcv's ops, 'MMSyncBN'
    classes = [torch.nn.SyncBatchNorm]
    try:
        from mmcv.ops import SyncBatchNorm
    except ImportError:  # mmcv without compiled ops: no MMSyncBN to look for
        pass
    else:
        classes.append(SyncBatchNorm)
    return tuple(classes)


def sync_bn_keys(cfg):
    """The keys of ``cfg`` that ask for a synchronised BatchNorm, as ``--cfg-options`` spells them.

    Every dict under ``cfg.model`` whose ``type`` is (or is registered as) torch's or mmcv's SyncBatchNorm, e.g.
    ``model.backbone.norm_cfg``, and ``sync_bn`` when it is set (mmengine then converts every BatchNorm).
    """
    classes = _sync_bn_classes()
    keys = []

    def is_sync_bn(norm_type):
        if isinstance(norm_type, str):
            norm_type = MODELS.get(norm_type)
        return isinstance(norm_type, type) and issubclass(norm_type, classes)

    def walk(node, path):
        if isinstance(node, dict):
            if is_sync_bn(node.get('type')):
                keys.append(path)
            for key, value in node.items():
                walk(value, f'{path}.{key}')
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f'{path}.{index}')

    walk(cfg.get('model', {}), 'model')
    if cfg.get('sync_bn') is not None:
        keys.append('sync_bn')
    return keys


def check_no_sync_bn(cfg):
    """Raise a ``ValueError`` naming every SyncBN key of ``cfg`` (see :func:`sync_bn_keys`) and the fix."""
    keys = sync_bn_keys(cfg)
    if keys:
        fixes = ' '.join('sync_bn=None' if key == 'sync_bn' else f'{key}.type=BN' for key in keys)
        raise ValueError(
            f'SyncBN needs CUDA: torch\'s SyncBatchNorm refuses CPU tensors in a process group and mmcv\'s MMSyncBN '
            f'is CUDA-only, but the config asks for it in: {", ".join(keys)}. To train on CPU processes, use BN '
            f'there: --cfg-options {fixes} (each process then normalises with the statistics of its own batch, '
            f'and keeps its own running statistics).')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a config in several CPU processes (gloo), started by python -m torch.distributed.run')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--work-dir', help='where to save logs and checkpoints (default: ./work_dirs/<config>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, as for mmdet/mmseg tools/train.py: KEY=VALUE ...')
    return parser.parse_args(argv)


def build_cfg(args):
    """The config as ``tools/train.py`` would build it with ``--launcher pytorch``, made to run on CPU processes."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    check_no_sync_bn(cfg)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.launcher = 'pytorch'
    env_cfg = cfg.setdefault('env_cfg', {})
    env_cfg['dist_cfg'] = dict(env_cfg.get('dist_cfg') or {}, backend='gloo')

    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_type = wrapper.get('type', 'MMDistributedDataParallel')
    wrapper_class = MODEL_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) else wrapper_type
    if wrapper_class is None:
        raise ValueError(f'model_wrapper_cfg.type={wrapper_type!r} is not a registered model wrapper')
    if issubclass(wrapper_class, DistributedDataParallel):
        wrapper['device_ids'] = None  # a CPU module; mmengine would pass [LOCAL_RANK]
    cfg.model_wrapper_cfg = wrapper
    return cfg


def init_process_group(cfg):
    """Join the gloo process group that ``torch.distributed.run`` describes in the environment."""
    missing = [name for name in LAUNCH_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f'mmgroupmamba.cpu_ddp: {", ".join(missing)} not set; start it with python -m '
                           f'torch.distributed.run --nproc_per_node N -m mmgroupmamba.cpu_ddp CONFIG ...')
    if torch.cuda.is_available():
        raise RuntimeError('mmgroupmamba.cpu_ddp trains on CPU processes, but CUDA is available: on GPUs use '
                           'mim train ... --launcher pytorch --gpus N (or hide the GPUs: CUDA_VISIBLE_DEVICES=)')
    timeout = cfg.env_cfg.dist_cfg.get('timeout')
    kwargs = {} if timeout is None else dict(timeout=timedelta(seconds=timeout))
    torch_dist.init_process_group(backend='gloo', init_method='env://', **kwargs)


def main(argv=None):
    cfg = build_cfg(parse_args(argv))
    init_process_group(cfg)
    try:
        Runner.from_cfg(cfg).train()
    finally:
        torch_dist.destroy_process_group()


if __name__ == '__main__':
    main()

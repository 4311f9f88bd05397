"""A hook for the CPU DDP tests: each rank writes what it trained on and where it ended to ``out_dir/rank<R>.pt``.

Imported by the training processes through the test config's ``custom_imports`` (the tests put this folder on
``PYTHONPATH``).
"""
import os
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RecordRankHook(Hook):
    """Records, on every rank: the parameters before the first step, each iteration's losses and image paths,
    and after training the model's state dict, the optimizer's state and its param groups (parameter names)."""

    priority = 'LOWEST'

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.record = dict(iterations=[])

    def _module(self, runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner):
        self.record['wrapper'] = type(runner.model).__name__
        self.record['initial'] = {name: p.detach().clone() for name, p in self._module(runner).named_parameters()}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.record['iterations'].append(dict(
            losses={key: float(value.detach()) for key, value in outputs.items()},
            images=[sample.metainfo['img_path'] for sample in data_batch['data_samples']]))

    def after_train(self, runner):
        module = self._module(runner)
        name_of = {id(p): name for name, p in module.named_parameters()}
        optimizer = runner.optim_wrapper.optimizer
        self.record.update(
            rank=runner.rank,
            world_size=runner.world_size,
            # Parameters under their own names (state_dict() maps GroupMamba's packed ones to official keys).
            final={name: t.detach().clone() for name, t in (*module.named_parameters(), *module.named_buffers())},
            trainable=[name for name, p in module.named_parameters() if p.requires_grad],
            optimizer_state=optimizer.state_dict()['state'],
            param_groups=[dict({k: v for k, v in group.items() if k != 'params'},
                               params=[name_of[id(p)] for p in group['params']])
                          for group in optimizer.param_groups])
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(self.record, osp.join(self.out_dir, f'rank{runner.rank}.pt'))

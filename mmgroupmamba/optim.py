"""An optimizer-wrapper constructor that keeps ``paramwise_cfg`` but puts parameters of equal settings into one
param group.

Why: mmengine's ``DefaultOptimWrapperConstructor`` gives every parameter its own param group once
``paramwise_cfg`` is set. A GroupMamba-T Mask R-CNN has several hundred parameters (over a thousand before
the scan groups' parameters were packed), so as many groups, and PyTorch's AdamW runs its multi-tensor
(``foreach``) kernels once per group: thousands of launches per step, paid on the host.
Parameters whose group settings are equal (lr, weight decay, ...) are merged here, in the order of their
first appearance, so the optimizer sees a handful of groups and the same per-parameter settings.
"""
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


def merge_param_groups(groups):
    """``groups`` (dicts with ``params`` and settings) merged by equal settings, first-appearance order."""
    merged = {}
    for group in groups:
        settings = {k: v for k, v in group.items() if k != 'params'}
        # repr: settings may hold unhashable values (e.g. betas as a list from a config).
        key = repr(sorted(settings.items()))
        if key not in merged:
            merged[key] = dict(settings, params=[])
        merged[key]['params'].extend(group['params'])
    return list(merged.values())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MergedGroupsOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` whose ``paramwise_cfg`` groups are merged by equal settings.

    Use it as ``optim_wrapper = dict(constructor='MergedGroupsOptimWrapperConstructor', ...)``; everything else
    (``paramwise_cfg`` keys, ``custom_keys``, ``clip_grad``, AMP) is the default constructor's. Checkpoints of
    the optimizer state hold the merged groups: resume with the same constructor.
    """

    def add_params(self, params, module, prefix='', is_dcn_module=None):
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix == '':  # the outermost call, after the recursion over all submodules
            params[:] = merge_param_groups(params)

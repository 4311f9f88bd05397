"""GroupMamba's channel affinity as a custom op: the layer's ``C -> C/16 -> C`` bottleneck MLP on its pooled
map (``fc1``, ReLU, ``fc2``, sigmoid) times its skip scale, one Triton launch forward and two backward (a
kernel, a sum), where PyTorch spent 15 launches per block on a few microseconds of work. The reference
elsewhere.
"""
import torch

from .dispatch import triton_module
from .layout import unpad_groups
from .ops_util import cast, fused_op, reduced_dtype, reference_grads
from .reference import channel_affinity_dtype, channel_affinity_reference


def _stored_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """The reference for a pooled map in its stored layout (``layout.py``): its valid channels, compact."""
    return channel_affinity_reference(unpad_groups(pooled, fc1_weight.shape[1]), fc1_weight, fc1_bias, fc2_weight,
                                      fc2_bias, skip_scale)


def _affinity_fwd_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    with torch.no_grad():
        return _stored_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale).contiguous()


@fused_op('mmgroupmamba::channel_affinity_fwd', reference=_affinity_fwd_reference)
def channel_affinity_fwd(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                         fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, skip_scale: torch.Tensor) -> torch.Tensor:
    """The compact ``(B, C)`` scale, in :func:`~mmgroupmamba.kernels.reference.channel_affinity_dtype`."""
    return triton_module('triton_affinity', pooled.device).affinity_forward(
        pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)


@channel_affinity_fwd.register_fake
def _(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    return pooled.new_empty((pooled.shape[0], fc1_weight.shape[1]), dtype=channel_affinity_dtype(pooled))


def _affinity_bwd_reference(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    # Autocast off for the backward's matmuls too: a backward called under autocast would run them in half
    # precision.
    with torch.autocast(pooled.device.type, enabled=False):
        (dpooled, *param_grads), _ = reference_grads(
            _stored_reference, (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale), dscale)
    return dpooled, torch.cat([g.flatten() for g in param_grads]).to(reduced_dtype(pooled))


@fused_op('mmgroupmamba::channel_affinity_bwd', reference=_affinity_bwd_reference)
def channel_affinity_bwd(dscale: torch.Tensor, pooled: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                         skip_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dpooled, dparams)``: the pooled map's gradient in its dtype and stored layout, and the parameters'
    gradients as one flat fp32 (fp64 for fp64 input) tensor in :func:`param_grad_sizes` order, reduced over the
    batch in one launch (a custom op's outputs may not be views of each other: :func:`param_grads` splits it)."""
    return triton_module('triton_affinity', pooled.device).affinity_backward(
        dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)


@channel_affinity_bwd.register_fake
def _(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    size = sum(param_grad_sizes(fc1_weight.shape[1], fc1_weight.shape[0]))
    return (torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device),
            pooled.new_empty((size,), dtype=reduced_dtype(pooled)))


def param_grad_sizes(channels, units):
    """Element counts of the parameters' gradients in :func:`channel_affinity_bwd`'s flat output, in order:
    ``fc1``'s weight ``(R, C)`` and bias, ``fc2``'s weight ``(C, R)`` and bias, the skip scale."""
    return [units * channels, units, channels * units, channels, 1]


def param_grads(dparams, params):
    """The flat gradients of :func:`channel_affinity_bwd` as one tensor per parameter (views, then cast to its
    dtype where it differs)."""
    fc1_weight = params[0]
    parts = dparams.split(param_grad_sizes(fc1_weight.shape[1], fc1_weight.shape[0]))
    return [cast(g.view(p.shape), p.dtype) for g, p in zip(parts, params)]


def _affinity_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affinity_backward(ctx, dscale):
    pooled, *params = ctx.saved_tensors
    dpooled, dparams = channel_affinity_bwd(dscale, pooled, *params)
    return dpooled, *param_grads(dparams, params)


channel_affinity_fwd.register_autograd(_affinity_backward, setup_context=_affinity_setup)


def channel_affinity(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """``skip_scale * sigmoid(F.linear(relu(F.linear(pooled, fc1_weight, fc1_bias)), fc2_weight, fc2_bias))``.

    Args:
        pooled (Tensor): ``(B, S)``, any float dtype: the layer's map averaged over H and W, in its stored
            layout (``S == C``, or a padded stage's ``C`` channels stored as ``S``:
            :mod:`mmgroupmamba.kernels.layout`). Its gradient comes back in that layout, zero in the pad channels.
        fc1_weight, fc1_bias (Tensor): ``(R, C)`` and ``(R,)``.
        fc2_weight, fc2_bias (Tensor): ``(C, R)`` and ``(C,)``.
        skip_scale (Tensor): one element.

    Returns:
        Tensor: ``(B, C)``, compact, in fp32 (fp64 for fp64 ``pooled``), computed in fp32 whatever the input's dtype and
        autocast: the parameters are used as they are, not cast. Gradients come back in the inputs' dtypes.

    Dispatch follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    return channel_affinity_fwd(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)

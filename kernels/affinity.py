"""GroupMamba's channel affinity as a custom op: the layer's ``C -> C/16 -> C`` bottleneck MLP on its pooled
map (``fc1``, ReLU, ``fc2``, sigmoid) times its skip scale, one Triton launch forward and one backward, where
PyTorch spent about 22 launches per block on a few microseconds of work. The reference elsewhere.
"""
import torch

from .dispatch import triton_module
from .ops_util import fused_op, reference_grads
from .reference import channel_affinity_dtype, channel_affinity_reference


def _affinity_fwd_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    with torch.no_grad():
        return channel_affinity_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                          skip_scale).contiguous()


@fused_op('mmgroupmamba::channel_affinity_fwd', reference=_affinity_fwd_reference)
def channel_affinity_fwd(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                         fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, skip_scale: torch.Tensor) -> torch.Tensor:
    """The ``(B, C)`` scale, in :func:`~mmgroupmamba.kernels.reference.channel_affinity_dtype`."""
    return triton_module('triton_affinity', pooled.device).affinity_forward(
        pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)


@channel_affinity_fwd.register_fake
def _(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    return pooled.new_empty(pooled.shape, dtype=channel_affinity_dtype(pooled))


def _affinity_bwd_reference(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    # Autocast off for the backward's matmuls too: a backward called under autocast would run them in half
    # precision.
    with torch.autocast(pooled.device.type, enabled=False):
        grads, _ = reference_grads(channel_affinity_reference,
                                   (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale), dscale)
    return grads


@fused_op('mmgroupmamba::channel_affinity_bwd', reference=_affinity_bwd_reference)
def channel_affinity_bwd(dscale: torch.Tensor, pooled: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                         skip_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
    """The gradients of the op's inputs, ``(dpooled, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias,
    dskip_scale)``, each in its input's dtype."""
    return triton_module('triton_affinity', pooled.device).affinity_backward(
        dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)


@channel_affinity_bwd.register_fake
def _(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                 for t in (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale))


def _affinity_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affinity_backward(ctx, dscale):
    return channel_affinity_bwd(dscale, *ctx.saved_tensors)


channel_affinity_fwd.register_autograd(_affinity_backward, setup_context=_affinity_setup)


def channel_affinity(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """``skip_scale * sigmoid(F.linear(relu(F.linear(pooled, fc1_weight, fc1_bias)), fc2_weight, fc2_bias))``.

    Args:
        pooled (Tensor): ``(B, C)``, any float dtype (the layer's map averaged over H and W).
        fc1_weight, fc1_bias (Tensor): ``(R, C)`` and ``(R,)``.
        fc2_weight, fc2_bias (Tensor): ``(C, R)`` and ``(C,)``.
        skip_scale (Tensor): one element.

    Returns:
        Tensor: ``(B, C)`` in fp32 (fp64 for fp64 ``pooled``), computed in fp32 whatever the input's dtype and
        autocast: the parameters are used as they are, not cast. Gradients come back in the inputs' dtypes.

    Dispatch follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    return channel_affinity_fwd(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)

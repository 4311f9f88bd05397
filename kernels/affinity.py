"""GroupMamba's channel affinity as a custom op: the layer's ``C -> C/16 -> C`` bottleneck MLP on its map's
mean over H and W (``fc1``, ReLU, ``fc2``, sigmoid) times its skip scale. Forward, the mean and one Triton launch;
backward, a kernel and a sum, the kernel giving the map's gradient already divided by its positions (handed back
as a broadcast view). Unfused, PyTorch spent 15 launches per block on a few microseconds of work. The reference
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


def _affinity_fwd_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    with torch.no_grad():
        pooled = x.mean((1, 2))
        return _stored_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale).contiguous(), pooled


@fused_op('mmgroupmamba::channel_affinity_fwd', reference=_affinity_fwd_reference)
def channel_affinity_fwd(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                         fc2_bias: torch.Tensor, skip_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, pooled)``: the compact ``(B, C)`` scale in
    :func:`~mmgroupmamba.kernels.reference.channel_affinity_dtype`, and the map's mean over its positions ``(B, S)``
    in x's dtype, which the backward reads."""
    pooled = x.mean((1, 2))
    return triton_module('triton_affinity', x.device).affinity_forward(
        pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale), pooled


@channel_affinity_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    batch, stored = x.shape[0], x.shape[-1]
    return (x.new_empty((batch, fc1_weight.shape[1]), dtype=channel_affinity_dtype(x)),
            x.new_empty((batch, stored)))


def _affinity_bwd_reference(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, positions):
    # Autocast off for the backward's matmuls too: a backward called under autocast would run them in half
    # precision. The pooled map's gradient in fp32, divided, then rounded once, as the kernel does.
    with torch.autocast(pooled.device.type, enabled=False):
        (dpooled, *param_grads), _ = reference_grads(
            _stored_reference, (pooled.to(channel_affinity_dtype(pooled)), fc1_weight, fc1_bias, fc2_weight,
                                fc2_bias, skip_scale), dscale)
    return ((dpooled / positions).to(pooled.dtype),
            torch.cat([g.flatten() for g in param_grads]).to(reduced_dtype(pooled)))


@fused_op('mmgroupmamba::channel_affinity_bwd', reference=_affinity_bwd_reference)
def channel_affinity_bwd(dscale: torch.Tensor, pooled: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                         skip_scale: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dposition, dparams)``: the gradient of each of the map's ``positions`` (the pooled map's gradient
    divided by them: the mean's backward), ``(B, S)`` in the pooled map's dtype and stored layout, and the
    parameters' gradients as one flat fp32 (fp64 for fp64 input) tensor in :func:`param_grad_sizes` order,
    reduced over the batch in one launch (a custom op's outputs may not be views of each other:
    :func:`param_grads` splits it)."""
    return triton_module('triton_affinity', pooled.device).affinity_backward(
        dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, positions)


@channel_affinity_bwd.register_fake
def _(dscale, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale, positions):
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
    x, *params = inputs
    scale, pooled = output
    ctx.mark_non_differentiable(pooled)
    ctx.set_materialize_grads(False)  # the pooled output gets no gradient: no zero fill for it in every backward
    ctx.save_for_backward(pooled, *params)
    ctx.map_shape = x.shape


def _affinity_backward(ctx, dscale, _dpooled):
    pooled, *params = ctx.saved_tensors
    height, width = ctx.map_shape[1:3]
    dposition, dparams = channel_affinity_bwd(dscale, pooled, *params, height * width)
    # Every position of an image's map gets the same gradient: a broadcast view, no map written (autograd's own
    # mean would write one, for it only to be added to x's other gradients).
    return dposition[:, None, None, :].expand(ctx.map_shape), *param_grads(dparams, params)


channel_affinity_fwd.register_autograd(_affinity_backward, setup_context=_affinity_setup)


def channel_affinity(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """``skip_scale * sigmoid(F.linear(relu(F.linear(x.mean((1, 2)), fc1_weight, fc1_bias)), fc2_weight,
    fc2_bias))``: the channel affinity of a map, pooled over its positions.

    Args:
        x (Tensor): ``(B, H, W, S)``, any float dtype: the layer's map in its stored layout (``S == C``, or a padded
            stage's ``C`` channels stored as ``S``: :mod:`mmgroupmamba.kernels.layout`). It is pooled in its dtype;
            its gradient comes back in that layout, zero in the pad channels, as a view broadcast over H and W.
        fc1_weight, fc1_bias (Tensor): ``(R, C)`` and ``(R,)``.
        fc2_weight, fc2_bias (Tensor): ``(C, R)`` and ``(C,)``.
        skip_scale (Tensor): one element.

    Returns:
        Tensor: ``(B, C)``, compact, in fp32 (fp64 for fp64 ``x``), computed in fp32 whatever the input's dtype and
        autocast: the parameters are used as they are, not cast. Gradients come back in the inputs' dtypes.

    Dispatch follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    return channel_affinity_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale)[0]

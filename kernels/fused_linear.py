"""An op followed by a linear layer, keeping for backward only what the op keeps.

Autograd would also keep the op's output, a full map, for the linear layer's weight gradient. Here the op's
backward kernel recomputes that output from what it reads anyway (one extra write), so the pair keeps the op's
inputs only. GroupMamba runs three such pairs per block: the gated group norm -> ``out_proj``, the modulated
LayerNorm -> ``proj`` and the FFN's LayerNorm -> ``fc1`` (with the residual add before it:
``residual_layer_norm_linear``); and the FFN's depthwise conv + GELU -> ``fc2``, whose
8x-channel hidden maps are the largest activations of the model.

Each pair is a ``torch.autograd.Function`` over the custom ops, which ``torch.compile`` traces into its graph;
in plain eager its forward and backward call the ops' implementations directly (``ops_util.FusedOp``).
"""
import torch
import torch.nn.functional as F

from .dwconv import dwconv_act_backward, dwconv_act_forward
from .gated_norm import (
    gated_group_norm_fwd,
    gated_group_norm_grads,
    modulated_layer_norm_fwd,
    modulated_layer_norm_grads,
    promoted_dtype,
    residual_layer_norm_fwd,
    residual_layer_norm_grads,
)
from .ops_util import cast


def _compute_dtype(t):
    """The dtype the linear layer runs in: autocast's when it is on for ``t``'s device, else ``t``'s."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _linear_forward(ctx, out, weight, bias):
    """``F.linear(out, weight, bias)`` in the compute dtype; keeps the cast weight for backward."""
    dtype = _compute_dtype(out)
    weight_c = cast(weight, dtype)
    ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
    return F.linear(cast(out, dtype), weight_c, None if bias is None else cast(bias, dtype)), weight_c


def _linear_backward(ctx, grad_out, weight_c, recompute):
    """The linear layer's gradients; ``recompute(grad_op_out)`` runs the op's backward and returns its input
    gradients and its recomputed output, followed by its ones column (``ops_util.with_ones_column``).

    One matmul gives the weight's gradient and, in the column the ones meet, the bias's: the sum of the output
    gradient over its rows, without a reduction that reads that gradient again (on an H100 those reductions took
    1.5 ms of a detection step's kernels, the matmul's extra columns about 0.2 ms: kernels/README.md). The sum
    comes in the compute dtype, as PyTorch's own linear layer gives it under autocast."""
    grad_out2 = cast(grad_out.reshape(-1, grad_out.shape[-1]), weight_c.dtype)
    in_features = weight_c.shape[1]
    grad_op_out = (grad_out2 @ weight_c).view(*grad_out.shape[:-1], in_features)
    grads, op_out = recompute(grad_op_out)
    weight_dtype, bias_dtype = ctx.param_dtypes
    grad_both = grad_out2.t() @ cast(op_out.reshape(-1, op_out.shape[-1]), weight_c.dtype)
    # Views of the matmul's result where no cast makes a copy: the consumers copy only what they must (a block's
    # parameters, cast together, take their gradients into one concatenation and one cast, the bias column read
    # as it is; autograd's AccumulateGrad lays a leaf's gradient out in C++), without a contiguous() call each on
    # the eager step's host path.
    grad_weight = cast(grad_both[:, :in_features], weight_dtype)
    grad_bias = None if bias_dtype is None else cast(grad_both[:, in_features], bias_dtype)
    return grad_weight, grad_bias, grads


class GatedNormLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, bias, groups, eps, out_dtype, linear_weight, linear_bias):
        normed, mean, rstd = gated_group_norm_fwd(y, z, weight, bias, groups, eps, out_dtype, y.shape[-1])
        out, weight_c = _linear_forward(ctx, normed, linear_weight, linear_bias)
        ctx.save_for_backward(y, z, weight, bias, mean, rstd, weight_c)
        ctx.constants = (groups, eps, out_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, z, weight, bias, mean, rstd, weight_c = ctx.saved_tensors

        def recompute(grad_normed):
            *grads, normed = gated_group_norm_grads(grad_normed, y, z, weight, bias, mean, rstd, *ctx.constants, True)
            return grads, normed

        grad_lw, grad_lb, (dy, dz, dw, db) = _linear_backward(ctx, grad_out, weight_c, recompute)
        return dy, dz, dw, db, None, None, None, grad_lw, grad_lb


class ResidualNormLinearFn(torch.autograd.Function):
    """The residual add and the LayerNorm after it (``residual_layer_norm``), then the linear layer: ``(total,
    out)``. The sum is an output (the next residual add reads it) and the norm's backward reads it."""

    @staticmethod
    def forward(ctx, x, branch, keep, weight, bias, eps, out_dtype, linear_weight, linear_bias):
        total, normed, mean, rstd = residual_layer_norm_fwd(x, branch, keep, weight, bias, eps, out_dtype,
                                                            x.shape[-1])
        out, weight_c = _linear_forward(ctx, normed, linear_weight, linear_bias)
        ctx.save_for_backward(total, keep, weight, bias, mean, rstd, weight_c)
        ctx.constants = (eps, out_dtype, branch.dtype)
        ctx.set_materialize_grads(False)  # either output's gradient may be absent: no zero fill for it
        return total, out

    @staticmethod
    def backward(ctx, grad_total, grad_out):
        *saved, weight_c = ctx.saved_tensors
        if grad_out is None:  # only the sum was read on
            dx, dbranch, *_ = residual_layer_norm_grads(None, grad_total, *saved, *ctx.constants, False)
            return dx, dbranch, None, None, None, None, None, None, None

        def recompute(grad_normed):
            *grads, normed = residual_layer_norm_grads(grad_normed, grad_total, *saved, *ctx.constants, True)
            return grads, normed

        grad_lw, grad_lb, (dx, dbranch, dw, db) = _linear_backward(ctx, grad_out, weight_c, recompute)
        return dx, dbranch, None, dw, db, None, None, grad_lw, grad_lb


class ModulatedNormLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, scale, weight, bias, eps, linear_weight, linear_bias):
        normed, mean, rstd = modulated_layer_norm_fwd(y, x, scale, weight, bias, eps)
        out, weight_c = _linear_forward(ctx, normed, linear_weight, linear_bias)
        ctx.save_for_backward(y, x, scale, weight, bias, mean, rstd, weight_c)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, weight_c = ctx.saved_tensors

        def recompute(grad_normed):
            *grads, normed = modulated_layer_norm_grads(grad_normed, *saved, ctx.eps, True)
            return grads, normed

        grad_lw, grad_lb, (dy, dx, dscale, dw, db) = _linear_backward(ctx, grad_out, weight_c, recompute)
        return dy, dx, dscale, dw, db, None, grad_lw, grad_lb


class ConvActLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, conv_weight, conv_bias, activation, linear_weight, linear_bias):
        out, weight_c = _linear_forward(ctx, dwconv_act_forward(h, conv_weight, conv_bias, activation),
                                        linear_weight, linear_bias)
        ctx.save_for_backward(h, conv_weight, conv_bias, weight_c)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, conv_weight, conv_bias, weight_c = ctx.saved_tensors

        def recompute(grad_hidden):
            dh, dw, db, hidden = dwconv_act_backward(cast(grad_hidden, h.dtype), h, conv_weight, conv_bias,
                                                     ctx.activation, True)
            return (dh, dw, db), hidden

        grad_lw, grad_lb, (dh, dw, db) = _linear_backward(ctx, grad_out, weight_c, recompute)
        return dh, dw, db, None, grad_lw, grad_lb


def gated_group_norm_linear(y, z, weight, bias, groups, eps, linear_weight, linear_bias=None, out_dtype=None):
    """``F.linear(gated_group_norm(y, z, weight, bias, groups, eps, out_dtype), linear_weight, linear_bias)``.

    Here and in the other pairs, the linear layer's parameters may come in the compute dtype already (a block
    casts its weights and biases together, in one launch each way) or be cast here."""
    return GatedNormLinearFn.apply(y, z, weight, bias, groups, eps, out_dtype or promoted_dtype(y, z),
                                   linear_weight, linear_bias)


def layer_norm_linear(x, weight, bias, eps, out_dtype, linear_weight, linear_bias=None):
    """``F.linear(layer_norm(x, weight, bias, eps, out_dtype), linear_weight, linear_bias)``."""
    return gated_group_norm_linear(x, None, weight, bias, 1, eps, linear_weight, linear_bias, out_dtype)


def residual_layer_norm_linear(x, branch, keep, weight, bias, eps, out_dtype, linear_weight, linear_bias=None):
    """``(total, F.linear(normed, linear_weight, linear_bias))`` for ``(total, normed) = residual_layer_norm(x,
    branch, keep, weight, bias, eps, out_dtype)``: a residual add, the norm after it and the linear layer after
    that."""
    return ResidualNormLinearFn.apply(x, branch, keep, weight, bias, eps, out_dtype, linear_weight, linear_bias)


def modulated_layer_norm_linear(y, x, scale, weight, bias, eps, linear_weight, linear_bias=None):
    """``F.linear(modulated_layer_norm(y, x, scale, weight, bias, eps), linear_weight, linear_bias)``."""
    return ModulatedNormLinearFn.apply(y, x, scale, weight, bias, eps, linear_weight, linear_bias)


def depthwise_conv_act_linear(h, conv_weight, conv_bias, activation, linear_weight, linear_bias=None):
    """``F.linear(depthwise_conv_act(h, conv_weight, conv_bias, activation), linear_weight, linear_bias)``."""
    return ConvActLinearFn.apply(h, conv_weight, conv_bias, activation, linear_weight, linear_bias)

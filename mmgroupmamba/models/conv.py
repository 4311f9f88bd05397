"""A ``Conv2d`` whose compiled form keeps the input sizes symbolic (``torch.compile(dynamic=True)``).

In torch 2.14.1 (the pinned version) Inductor lowers a convolution's backward itself
(``convolution_backward_lowering``). In a backward graph, whose layout optimisation is off, that lowering orders
the gradients' strides by evaluating them to integers (``get_stride_order(guard_int_seq(layout.stride))``): every
symbolic size behind a stride becomes a guard on its value, and an input of a new size compiles the whole
backbone again (one graph per size on the CPU: README, thirty-eighth and thirty-ninth sessions). Nothing in that
code depends on the device, and on CUDA the lowering then falls back to ATen's kernel anyway. The lent GPU image's
torch 2.11 compiled one graph for three sizes with plain convs (thirty-ninth session). Inductor's
``force_layout_optimization``, which takes the lowering's other branch, still compiled three graphs for three
sizes (CPU, ``conv_backward_guard.py``'s conv cases).

:class:`OpaqueConv2d` runs its convolution through a custom op, ``mmgroupmamba::conv2d``, whose backward is a
second one calling ``aten.convolution_backward``: Inductor sees two extern calls with the same kernels, and no
lowering evaluates their strides. Calls that are run rather than traced (``kernels.ops_util.traced``, as the fused
ops decide it) skip the ops (a custom op's dispatch costs the host tens of microseconds a call) and run
``nn.Conv2d``'s own forward, the same ATen convolution.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgroupmamba.kernels.ops_util import traced


@torch.library.custom_op('mmgroupmamba::conv2d', mutates_args=())
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
           padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    # ATen's meta function gives the output's sizes and its memory format (channels-last in, channels-last out).
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op('mmgroupmamba::conv2d_backward', mutates_args=())
def conv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: List[int],
                    padding: List[int], dilation: List[int], groups: int,
                    output_mask: List[bool]) -> List[torch.Tensor]:
    """``[grad_x, grad_weight, grad_bias]``, each empty where ``output_mask`` does not ask for it (a custom op
    returns tensors only)."""
    return _convolution_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask)


@conv2d_backward.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, output_mask):
    return _convolution_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask)


def _convolution_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask):
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    grads = torch.ops.aten.convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, False,
                                                [0, 0], groups, output_mask)
    return [grad_out.new_empty(0) if g is None else g for g in grads]


def _setup_context(ctx, inputs, output):
    x, weight, bias, *ctx.conv_args = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    output_mask = [needs_x, needs_weight, ctx.has_bias and needs_bias]
    grads = conv2d_backward(grad_out, x, weight, *ctx.conv_args, output_mask)
    return (*(g if wanted else None for g, wanted in zip(grads, output_mask)), None, None, None, None)


conv2d.register_autograd(_backward, setup_context=_setup_context)


class OpaqueConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state-dict keys and results) that compiles with symbolic sizes (module
    docstring). Zero padding only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != 'zeros' or isinstance(self.padding, str):
            raise ValueError(f'OpaqueConv2d: padding_mode={self.padding_mode!r}, padding={self.padding!r}; it takes '
                             "padding_mode='zeros' with padding given in pixels")

    def _conv_forward(self, x, weight, bias):
        # Traced (torch.compile, export, fake or proxy tensors, as the fused ops decide it): the op.
        if not traced((x, weight, bias)):
            return super()._conv_forward(x, weight, bias)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Autocast does not cast a custom op's inputs: cast them as it casts a conv's, all to its dtype.
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        return conv2d(x, weight, bias, list(self.stride), list(self.padding), list(self.dilation), self.groups)

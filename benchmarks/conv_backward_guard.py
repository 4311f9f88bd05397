"""Whether torch.compile with symbolic sizes (``dynamic=True``, Inductor) compiles one graph for a strided conv
whose input needs a gradient, as GroupMamba's downsampling convs do, or one graph per input size.

    python benchmarks/conv_backward_guard.py [--device cpu] [--sizes 32x48 40x56 64x32]

Three cases, each a fresh compile fed every size in turn (forward and backward of a 3x3 stride-2 conv, batch 2):

* ``input gradient``: the input needs a gradient (GroupMamba's downsampling convs, 3x3 stride 2);
* ``weight gradient only``: the input is data (mmdet's Swin-T's one conv, its patch embedding on the image);
* ``no conv``: a linear layer over the same maps, the control;

and the two conv cases again with GroupMamba's :class:`~mmgroupmamba.models.conv.OpaqueConv2d` (its convs run
through custom ops under torch.compile, their backward ATen's), which must compile one graph on any torch.

Printed: torch's version and, per case, the graphs Dynamo compiled for the sizes (one means symbolic sizes
work). Run with ``TORCH_LOGS=recompiles`` for the guards. On torch 2.14.1 (CPU, thirty-eighth session) both conv
cases compile once per size, the control once:

* with the input gradient, Inductor's own lowering of ``aten.convolution_backward`` orders the input gradient's
  strides by evaluating them to integers where layout optimisation is off, as it is in a backward graph
  (``kernel/conv.py``: ``ir.get_stride_order(guard_int_seq(layout_dx.stride))``); on the GPU image's torch 2.11
  the compiled det step calls that conv backward in ATen instead;
* with the weight gradient only, the backward graph guards on a saved activation's stride (for 32x48:
  ``16 + 16*((W - 1) // 2) == 384``).

With ``OpaqueConv2d`` both compile once (thirty-ninth session).
"""
import argparse

import torch

from mmgroupmamba.models.conv import OpaqueConv2d


def conv_input_grad(x, conv):
    return (conv(x).relu() ** 2).sum()


def conv_weight_grad(x, conv):
    return (conv(x.detach()).relu() ** 2).sum()


def linear(x, conv):
    # The conv's weight as a linear layer's (centre tap), over the map's pixels: no conv at all.
    return ((x.permute(0, 2, 3, 1) @ conv.weight[:, :, 1, 1].t()).relu() ** 2).sum()


def graphs_for(fn, sizes, device, conv_class=torch.nn.Conv2d):
    """Dynamo's graphs for ``fn`` after a forward and backward at each size (the conv a module of
    ``conv_class``, its weight a parameter, as in a backbone)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    conv = conv_class(8, 16, 3, stride=2, padding=1).to(device)
    for height, width in sizes:
        x = torch.randn(2, 8, height, width, device=device, requires_grad=True)
        compiled(x, conv).backward()
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--sizes', nargs='+', default=['32x48', '40x56', '64x32'], help='HxW, fed in this order')
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split('x')) for size in args.sizes]
    torch._dynamo.config.cache_size_limit = max(8, len(sizes) + 1)
    print(f'torch {torch.__version__}, {args.device}, sizes {" ".join(args.sizes)}')
    nn_conv, opaque = torch.nn.Conv2d, OpaqueConv2d
    for name, fn, conv_class in (('input gradient', conv_input_grad, nn_conv),
                                 ('weight gradient only', conv_weight_grad, nn_conv),
                                 ('no conv', linear, nn_conv),
                                 ('input gradient, OpaqueConv2d', conv_input_grad, opaque),
                                 ('weight gradient only, OpaqueConv2d', conv_weight_grad, opaque)):
        graphs = graphs_for(fn, sizes, args.device, conv_class)
        print(f'{name}: {graphs} graph(s) for {len(sizes)} sizes', flush=True)


if __name__ == '__main__':
    main()

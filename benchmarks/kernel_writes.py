"""What ``torch.compile`` would copy around each Triton launch (CPU, no GPU needed).

    python benchmarks/kernel_writes.py

Under ``torch.compile`` a Triton kernel launched through ``torch.library.wrap_triton`` is functionalized: every
tensor the kernel may write is cloned first, and a clone of a graph input (a parameter, an activation kept
for backward) stays in the compiled graph as a copy kernel, one launch and one pass over the tensor per call.
Which tensors a kernel may write, torch decides from the kernel's TTIR: it follows each store's address back
through every value it derives from, into all arguments of a helper call that produced one of them. A helper
that returns offsets and also takes a pointer thereby marks that pointer as written (the scan's ``A_logs`` and
delta bias and the channel affinity's four weights were, until their helpers were split).

A kernel that writes into views of one buffer (say, partial sums of two gradients in one tensor for one
reduction) is functionalized the same way: each view is cloned, written, and scattered back into the buffer;
the compiled graph runs those as copy kernels (the profile's ``triton_poi_fused_unbind`` kernels, from
``dw_part, db_part = dwb_part``). Such kernels now take the buffer itself and its parts' offset.

Each launcher is traced here with fake CUDA tensors under functionalization (``make_fx``), Triton's active
target set to sm_90 (no driver needed), and both kinds are listed. The outputs a launcher allocates whole are
cloned too, but those clones are of fresh buffers, which Inductor removes.
"""
import operator
import os

os.environ.pop('TRITON_INTERPRET', None)  # the interpreter's kernels have no TTIR to analyse

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from torch.library import wrap_triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from mmgroupmamba.kernels import dispatch, triton_affinity, triton_dwconv, triton_gated_norm, triton_scan  # noqa: E402

# Ops through which a graph node is a view of its input (a clone of such a view copies that input).
VIEW_OPS = ('view', 'slice', 'select', 'reshape', '_unsafe_view', 'as_strided', 't', 'permute', 'unsqueeze',
            'squeeze', 'expand', 'transpose', 'unflatten', 'flatten', 'split', 'unbind')


class _Sm90Target:
    """Triton's active driver as far as torch's TTIR generation asks: only the target."""

    def get_current_target(self):
        return GPUTarget('cuda', 90, 32)


def _is_view(node):
    """A view op, or its functionalized ``*_copy`` form (which stands for the view in such graphs)."""
    name = str(node.target).split('.')
    return node.op == 'call_function' and len(name) >= 2 and name[-2].removesuffix('_copy') in VIEW_OPS


def copies(launcher, *inputs):
    """``(inputs, views)``: ``[(kernel, argument), ...]`` of the launcher's inputs that functionalization clones
    for a kernel, and of the arguments it writes that are views of a buffer the launcher allocated (each is
    cloned and scattered back into that buffer: copies again)."""
    graph = make_fx(torch.func.functionalize(launcher), tracing_mode='fake')(*inputs).graph
    input_copies, view_writes = [], []
    for node in graph.nodes:
        if node.op != 'call_function' or 'triton_kernel_wrapper_functional' not in str(node.target):
            continue
        kernel = kernel_side_table.get_kernel(node.kwargs['kernel_idx'])
        for name in node.kwargs['tensors_to_clone']:
            source = node.kwargs['kwargs'][name]
            through_view = False
            while _is_view(source) or source.target is operator.getitem:
                through_view = through_view or _is_view(source)
                source = source.args[0]
            if source.op == 'placeholder':
                input_copies.append((kernel.fn.__name__, name))
            elif through_view:
                view_writes.append((kernel.fn.__name__, name))
    return input_copies, view_writes


@triton.jit
def _offsets_and_scale(S, n, BLOCK: tl.constexpr):
    # Returns offsets and takes a pointer: the pattern the analysis cannot see through.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n, tl.load(S)


@triton.jit
def _scaled_copy_kernel(X, S, Out, n, BLOCK: tl.constexpr):
    offs, ok, scale = _offsets_and_scale(S, n, BLOCK)
    tl.store(Out + offs, tl.load(X + offs, mask=ok) * scale, mask=ok)


def scaled_copy(x, scale):
    """The control: a kernel whose scale (read only) is marked written through its helper."""
    out = torch.empty_like(x)
    wrap_triton(_scaled_copy_kernel)[(triton.cdiv(x.numel(), 64),)](x, scale, out, x.numel(), BLOCK=64)
    return out


def launchers(mode):
    """``(name, launcher, inputs)`` for every Triton launcher, forward and backward, at small fake CUDA sizes."""
    def t(*shape, dtype=torch.float16):
        with mode:
            return torch.empty(*shape, dtype=dtype, device='cuda')

    def f32(*shape):
        return t(*shape, dtype=torch.float32)

    batch, length, channels = 2, 64, 32
    scan_inputs = (t(batch, length, channels), t(batch, length, channels), f32(channels), t(batch, length, 4),
                   t(batch, length, 4), f32(channels), f32(channels))

    def config(u):
        return triton_scan.choose_config(u, chunk_len=16)  # split into chunks: every pass of the scan runs

    x, dout = t(batch, 8, 8, channels), t(batch, 8, 8, channels)
    z = t(batch, 8, 8, 2 * channels)[..., channels:]
    weight, bias = f32(channels), f32(channels)
    rows = batch * 64
    return [
        ('control: a read-only scale behind a helper', scaled_copy, (f32(256), f32(1))),
        ('scan forward', lambda *a: triton_scan.scan_forward(*a, (8, 8), config(a[0]), True), scan_inputs),
        ('scan backward', lambda dy, states, *a: triton_scan.scan_backward(dy, *a, (8, 8), states, config(a[0])),
         (t(batch, length, channels), f32(batch, 2, channels), *scan_inputs)),
        ('channel affinity forward', triton_affinity.affinity_forward,
         (f32(4, channels), f32(2, channels), f32(2), f32(channels, 2), f32(channels), f32(1))),
        ('channel affinity backward', lambda *a: triton_affinity.affinity_backward(*a, 64),
         (f32(4, channels), f32(4, channels), f32(2, channels), f32(2), f32(channels, 2), f32(channels), f32(1))),
        ('depthwise conv forward', lambda *a: triton_dwconv.dwconv_act_forward(*a, 'gelu'),
         (x, f32(channels, 1, 3, 3), f32(channels))),
        ('depthwise conv backward', lambda *a: triton_dwconv.dwconv_act_backward(*a, 'gelu', True),
         (dout, x, f32(channels, 1, 3, 3), f32(channels))),
        ('gated group norm forward',
         lambda *a: triton_gated_norm.gated_norm_forward(*a, 4, 1e-5, torch.float16), (x, z, weight, bias)),
        ('gated group norm backward',
         lambda *a: triton_gated_norm.gated_norm_backward(*a, 4, torch.float16, True),
         (dout, x, z, weight, bias, f32(rows, 4), f32(rows, 4))),
        ('modulated norm forward', lambda *a: triton_gated_norm.modulated_norm_forward(*a, 1e-5),
         (x, t(batch, 8, 8, channels), f32(batch, channels), weight, bias)),
        ('modulated norm backward', lambda *a: triton_gated_norm.modulated_norm_backward(*a, True),
         (dout, x, t(batch, 8, 8, channels), f32(batch, channels), weight, bias, f32(rows), f32(rows))),
    ]


def main():
    triton.runtime.driver.set_active(_Sm90Target())
    dispatch._cuda_multiprocessors = lambda index: 132  # an H200's count: no device to ask
    print('| launcher | inputs copied before each launch (kernel: argument) | outputs written through views |')
    print('| --- | --- | --- |')
    for name, launcher, inputs in launchers(FakeTensorMode()):
        listed = [', '.join(f'{k}: {a}' for k, a in found) or 'none' for found in copies(launcher, *inputs)]
        print(f'| {name} | {" | ".join(listed)} |', flush=True)


if __name__ == '__main__':
    main()

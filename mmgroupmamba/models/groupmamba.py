"""GroupMamba backbone (Shaker et al., "GroupMamba: Efficient Group-Based Visual State Space Model", 2024).

Architectures (official T/S/B; ``C_i`` channels, ``D_i`` blocks and FFN ratio ``R_i`` of stage i):

    ======  ===============  ====================  ==============  ============  ==========================
    arch    stem hidden dim  embed dims C_1..C_4   depths D_i      FFN ratios    params (backbone / +cls)
    ======  ===============  ====================  ==============  ============  ==========================
    tiny    32               64, 128, 348, 448     3, 4, 9, 3      8, 8, 4, 4    20.46M / 23.36M
    small   64               64, 128, 348, 512     3, 4, 16, 3     8, 8, 4, 4    31.14M / 34.78M
    base    64               96, 192, 424, 512     3, 6, 21, 3     8, 8, 4, 4    53.51M / 57.15M
    ======  ===============  ====================  ==============  ============  ==========================

Layout::

    image -> patch_embed1 (conv stem, /4) -> block1 x D_1 -> norm1 -> out 0
          -> patch_embed2 (3x3 s2 conv)   -> block2 x D_2 -> norm2 -> out 1     ... -> norm4 -> out 3

    block:  x = x + DropPath(GroupMambaLayer(x));   x = x + DropPath(ConvFFN(norm2(x)))

    GroupMambaLayer (C channels, 4 groups of C/4):
        x = LayerNorm(x)
        per group g: in_proj -> (u, z); u = SiLU(dwconv3x3(u)); project u to (delta, B, C);
                     y = selective scan of u over the map in SCAN_DIRECTIONS[g] order (d_state=1);
                     y = out_norm(y) * SiLU(z); out_proj
        y = concat(groups) * skip_scale * x * sigmoid(fc2(relu(fc1(mean_hw(x)))))   (channel affinity)
        return proj(LayerNorm(y))          (the same LayerNorm as at the input, as in the official model)

Module and parameter names are the official ones (``block1.0.attn.mamba_g1.x_proj_weight``, ...), so official
checkpoints load unchanged. The four groups' parameters are kept per group under those names but are never
run group by group: each forward, :class:`GroupedLayerWeights` packs them, casts the matmul weights once to
the compute dtype and assembles block-diagonal weights, and every group runs in one linear layer, one fused
depthwise conv + SiLU and one scan launch. All tensors inside a stage are channels-last ``(B, H, W, C)``.

Why it is built this way: a GroupMamba step on the GPU is bound by host work per launch (measured on an
H200: ~3900 launches, 35 ms of kernels, 166 ms of wall time at 800x1344), so the layer is written for few
launches: packed weights, fused Triton kernels (``mmgroupmamba.kernels``: scan, gated group norm, modulated
LayerNorm, depthwise conv + activation), in-place reads of column slices, one addcmul for stochastic depth.
For inputs of a few fixed sizes, ``cuda_graph=True`` replays the whole backbone's forward and backward from
recorded CUDA graphs (:mod:`mmgroupmamba.models.cuda_graph`), which takes the host out of the step.
"""
import functools
import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from mmgroupmamba.checkpoint import load_backbone_checkpoint
from mmgroupmamba.models.cuda_graph import CudaGraphs
from mmgroupmamba.models.inputs import check_image_batch
from mmgroupmamba.kernels import (SCAN_DIRECTIONS, depthwise_conv_act, dwconv_act_backward, dwconv_act_forward,
                                  gated_group_norm_linear, layer_norm, layer_norm_linear,
                                  modulated_layer_norm_linear, selective_scan)

ARCH_SETTINGS = {
    'tiny': dict(stem_hidden_dim=32, embed_dims=[64, 128, 348, 448], mlp_ratios=[8, 8, 4, 4], depths=[3, 4, 9, 3]),
    'small': dict(stem_hidden_dim=64, embed_dims=[64, 128, 348, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 4, 16, 3]),
    'base': dict(stem_hidden_dim=64, embed_dims=[96, 192, 424, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 6, 21, 3]),
}
ARCH_KEYS = ('stem_hidden_dim', 'embed_dims', 'mlp_ratios', 'depths')
NUM_GROUPS = len(SCAN_DIRECTIONS)
# The official model builds its stage norms and FFN norms with eps=1e-6, and every other LayerNorm (stem,
# downsampling, the layer's own norm and the scan's out_norm) with PyTorch's default 1e-5.
STAGE_NORM_EPS = 1e-6


def resolve_arch(arch):
    """Return the architecture dict for a name in ``ARCH_SETTINGS`` or a user dict, checked."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise KeyError(f'GroupMamba: unknown arch {arch!r}; choose one of {sorted(ARCH_SETTINGS)} or pass a '
                           f'dict with keys {ARCH_KEYS}')
        return {k: (list(v) if isinstance(v, list) else v) for k, v in ARCH_SETTINGS[arch].items()}
    if not isinstance(arch, dict):
        raise TypeError(f'GroupMamba: arch must be a name or a dict, got {type(arch).__name__}')
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = [k for k in arch if k not in ARCH_KEYS]
    if missing or unknown:
        raise KeyError(f'GroupMamba: arch dict needs exactly the keys {ARCH_KEYS}; missing {missing}, '
                       f'unknown {unknown}')
    arch = {k: (list(arch[k]) if k != 'stem_hidden_dim' else int(arch[k])) for k in ARCH_KEYS}
    for key in ('embed_dims', 'mlp_ratios', 'depths'):
        if len(arch[key]) != 4:
            raise ValueError(f'GroupMamba: arch[{key!r}] needs one value per stage (4), got {arch[key]}')
    for dim in arch['embed_dims']:
        if dim % NUM_GROUPS:
            raise ValueError(f'GroupMamba: every embed dim must split into {NUM_GROUPS} scan groups, '
                             f'got embed_dims={arch["embed_dims"]}')
    return arch


def _compute_dtype(x):
    """The dtype the layer's matmuls run in: autocast's, when it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _block_diagonal(blocks, eye):
    """``(..., G, m, n)`` blocks -> ``(..., G*m, G*n)`` block-diagonal matrices in one multiply (``eye``: G x G).

    ``torch.block_diag`` copies block by block: many small launches per call.
    """
    *lead, groups, rows, cols = blocks.shape
    # Written into a contiguous buffer: the product alone would follow a transposed input's strides, and the
    # reshape would then copy.
    out = blocks.new_empty((*lead, groups, rows, groups, cols))
    torch.mul(blocks[..., :, :, None, :], eye[:, None, :, None], out=out)
    return out.view(*lead, groups * rows, groups * cols)


def _diagonal_blocks(matrix, groups):
    """The ``groups`` diagonal ``(m, n)`` blocks of a ``(..., G*m, G*n)`` matrix, as a strided view."""
    *lead, rows, cols = matrix.shape
    blocks = matrix.reshape(*lead, groups, rows // groups, groups, cols // groups)
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


class _Packing:
    """Parameters packed one after another into a 1-D buffer, read back as per-parameter views or as
    ``pieces`` (runs of consecutive parameters viewed together, e.g. the 4 groups' ``in_proj`` as one tensor).
    """

    def __init__(self, param_shapes, piece_shapes):
        self.param_shapes = [tuple(s) for s in param_shapes]
        self.piece_shapes = [tuple(s) for s in piece_shapes]
        self.param_sizes = [math.prod(s) for s in self.param_shapes]
        self.piece_sizes = [math.prod(s) for s in self.piece_shapes]
        self.numel = sum(self.param_sizes)
        assert self.numel == sum(self.piece_sizes)

    @staticmethod
    def pack(params, dtype):
        # One batched copy of all parameters (same dtype, contiguous), then at most one cast.
        return torch.cat([p.reshape(-1) for p in params]).to(dtype)

    def pieces(self, flat):
        return [t.view(s) for t, s in zip(flat.split(self.piece_sizes), self.piece_shapes)]

    def params(self, flat):
        return [t.view(s) for t, s in zip(flat.split(self.param_sizes), self.param_shapes)]


class _LayerPacking:
    """What :class:`GroupedLayerWeights` needs to know about one layer: its parameters, in packing order."""
    # Per-group parameters packed group after group, so the 4 groups of a name are one contiguous piece.
    MATMUL_GROUP_PARAMS = ('in_proj.weight', 'x_proj_weight', 'dt_projs_weight', 'out_proj.weight')
    LINEARS = ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias', 'proj.weight', 'proj.bias')
    FP32_GROUP_PARAMS = ('conv2d.weight', 'conv2d.bias', 'dt_projs_bias', 'A_logs', 'Ds', 'out_norm.weight',
                         'out_norm.bias')

    def __init__(self, layer):
        group = layer.mamba_g1
        self.dt_rank = group.dt_rank
        names = ([f'mamba_g{g + 1}.{n}' for n in self.MATMUL_GROUP_PARAMS for g in range(NUM_GROUPS)]
                 + list(self.LINEARS)
                 + [f'mamba_g{g + 1}.{n}' for n in self.FP32_GROUP_PARAMS for g in range(NUM_GROUPS)])
        self.names = names
        self._getters = [operator.attrgetter(name) for name in names]  # C-level lookups: run every forward
        shapes = {name: p.shape for name, p in layer.named_parameters()}
        self.num_matmul = NUM_GROUPS * len(self.MATMUL_GROUP_PARAMS) + len(self.LINEARS)
        self.matmul = _Packing(
            [shapes[n] for n in names[:self.num_matmul]],
            [(NUM_GROUPS, *shapes[f'mamba_g1.{n}'][-2:]) for n in self.MATMUL_GROUP_PARAMS]
            + [shapes[n] for n in self.LINEARS])
        self.linears_numel = sum(shapes[n].numel() for n in self.LINEARS)
        channels = NUM_GROUPS * group.Ds.numel()
        self.fp32 = _Packing([shapes[n] for n in names[self.num_matmul:]],
                             [(channels, 1, 3, 3)] + [(channels,)] * (len(self.FP32_GROUP_PARAMS) - 1))

    def gather(self, layer):
        return [get(layer) for get in self._getters]


class CastParameters(torch.autograd.Function):
    """Parameters cast to the compute dtype by one packed copy and one cast, where autocast would cast each at
    every use (and cast each gradient back): two launches forward and two backward instead of two per tensor.
    """

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.packing = _Packing([p.shape for p in params], [p.shape for p in params])
        return tuple(ctx.packing.pieces(_Packing.pack(params, dtype)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        shapes = ctx.packing.param_shapes
        grads = [g if g is not None else torch.zeros(s, device=grads[0].device) for g, s in zip(grads, shapes)]
        return (None, *ctx.packing.params(torch.cat([g.reshape(-1) for g in grads]).float()))


def _cast_parameters(dtype, *params):
    if all(p.dtype == dtype for p in params):
        return params
    return CastParameters.apply(dtype, *params)


@functools.lru_cache(maxsize=16)
def _identity(size, dtype, device):
    """A cached identity matrix (read only): building it is a launch per layer per step otherwise."""
    return torch.eye(size, dtype=dtype, device=device)


class GroupedLayerWeights(torch.autograd.Function):
    """A layer's parameters as the tensors its forward uses: the 4 groups' weights assembled into
    block-diagonal / concatenated form, every matmul weight already in the compute dtype.

    With autograd ops the same assembly took ~20 kernels forward and ~50 backward per layer, plus autocast's
    cast of every weight at every use: the training step was bound by launches on the host. Here forward
    packs, casts and assembles in ~9 kernels, and backward writes every parameter's gradient into its slot of
    two packed buffers (~12 kernels) and returns views of them.

    Outputs, in the compute dtype: ``in_proj (2C, C)`` (rows u then z), ``delta (C, C)`` (dt_proj folded into
    x_proj), ``bc (2G, C)`` (rows B_0..B_3, C_0..C_3), ``out_proj (C, C)``, then the fc1, fc2 and proj weights
    and biases; in fp32: the dwconv weight ``(C, 1, 3, 3)`` and bias, the delta bias, ``A = -exp(A_logs)``,
    D and the out_norm weight and bias (all ``(C,)``).
    """

    @staticmethod
    def forward(ctx, dtype, packing, *params):
        matmul = packing.matmul.pieces(packing.matmul.pack(params[:packing.num_matmul], dtype))
        fp32 = packing.fp32.pieces(packing.fp32.pack(params[packing.num_matmul:], torch.float32))
        in_proj, x_proj, dt_proj, out_proj, *linears = matmul
        conv_weight, conv_bias, delta_bias, A_logs, D, norm_weight, norm_bias = fp32
        groups, rank = NUM_GROUPS, packing.dt_rank
        eye = _identity(groups, dtype, in_proj.device)
        x_dt = x_proj[:, :rank]
        # (G, 2d, d) -> (2, G, d, d) -> block-diagonal (2, C, C) -> rows (u, z).
        in_uz = _block_diagonal(in_proj.unflatten(1, (2, -1)).transpose(0, 1), eye).flatten(0, 1)
        delta = _block_diagonal(torch.bmm(dt_proj, x_dt), eye)
        # (G, 2, d) B and C rows -> (2, 1, C) blocks per group -> (2G, C), group g's rows only on its channels.
        bc = _block_diagonal(x_proj[:, rank:].transpose(0, 1).unsqueeze(-2), eye).flatten(0, 1)
        A = A_logs.exp().neg_()
        ctx.save_for_backward(dt_proj, x_dt, A)
        ctx.packing = packing
        return (in_uz, delta, bc, _block_diagonal(out_proj, eye), *linears,
                conv_weight, conv_bias, delta_bias, A, D, norm_weight, norm_bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        dt_proj, x_dt, A = ctx.saved_tensors
        packing, groups, rank = ctx.packing, NUM_GROUPS, ctx.packing.dt_rank
        grouped = len(_LayerPacking.MATMUL_GROUP_PARAMS)  # the block-diagonal outputs come first
        num_linears = len(_LayerPacking.LINEARS)
        g_in_uz, g_delta, g_bc, g_out_proj = grads[:grouped]
        g_linears = grads[grouped:grouped + num_linears]
        g_fp32 = list(grads[grouped + num_linears:])

        # Each matmul weight's gradient is copied (and cast) straight into its slot of one fp32 buffer.
        alloc = torch.empty if all(g is not None for g in grads[:grouped]) else torch.zeros  # unwritten: 0
        flat = alloc(packing.matmul.numel, dtype=torch.float32, device=A.device)
        in_proj, x_proj, dt_proj_grad, out_proj, *linears = packing.matmul.pieces(flat)
        if g_in_uz is not None:
            in_proj.unflatten(1, (2, -1)).copy_(_diagonal_blocks(g_in_uz.unflatten(0, (2, -1)), groups)
                                                .transpose(0, 1))
        if g_delta is not None:
            g_blocks = _diagonal_blocks(g_delta, groups).contiguous()
            dt_proj_grad.copy_(torch.bmm(g_blocks, x_dt.transpose(1, 2)))
            x_proj[:, :rank].copy_(torch.bmm(dt_proj.transpose(1, 2), g_blocks))
        if g_bc is not None:
            x_proj[:, rank:].copy_(_diagonal_blocks(g_bc.unflatten(0, (2, -1)), groups).squeeze(-2).transpose(0, 1))
        if g_out_proj is not None:
            out_proj.copy_(_diagonal_blocks(g_out_proj, groups))
        # The linear layers' slots are adjacent, at the end: one cat and one cast-copy for all of them.
        g_linears = [g if g is not None else flat.new_zeros(slot.shape) for slot, g in zip(linears, g_linears)]
        flat[packing.matmul.numel - packing.linears_numel:].copy_(torch.cat([g.reshape(-1) for g in g_linears]))

        # fp32 parameters: one cat of their gradients (zeros where a gradient is missing).
        fp32_pieces = packing.fp32.piece_shapes
        if g_fp32[3] is not None:
            g_fp32[3] = g_fp32[3] * A  # d(-exp(a))/da = -exp(a) = A
        g_fp32 = [g if g is not None else A.new_zeros(shape) for g, shape in zip(g_fp32, fp32_pieces)]
        fp32 = torch.cat([g.reshape(-1).float() for g in g_fp32])
        return (None, None, *packing.matmul.params(flat), *packing.fp32.params(fp32))


def apply_layer_norm(norm, x):
    """``norm(x)`` for an ``nn.LayerNorm`` over the last dim, through the blocks' LayerNorm kernel on CUDA, with
    PyTorch's dtypes (fp32 out under autocast, x's dtype otherwise). PyTorch's kernel runs one thread block per
    row: its 8 calls (stem, downsampling and stage norms) took 2.5 ms of a GroupMamba-T bs128 step's 83 ms
    of kernels (H200 profile), ~210 us a forward call."""
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else None
    return layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype)


def _to_nchw(x):
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x):
    return x.permute(0, 2, 3, 1)


class ScanGroupParameters(nn.Module):
    """Parameters of one channel group's selective scan, under the official names (``mamba_g1`` ...).

    The group is never run on its own: :class:`GroupMambaLayer` assembles all groups' weights and runs them
    together.
    """

    def __init__(self, dims, d_state=1, d_conv=3):
        super().__init__()
        dt_rank = math.ceil(dims / 16)
        self.dt_rank = dt_rank
        self.in_proj = nn.Linear(dims, 2 * dims, bias=False)  # -> (u, z)
        self.conv2d = nn.Conv2d(dims, dims, d_conv, padding=(d_conv - 1) // 2, groups=dims)
        # (1, dt_rank + 2 * d_state, dims): the official x_proj of one scan direction, rows (dt, B, C).
        self.x_proj_weight = nn.Parameter(torch.empty(1, dt_rank + 2 * d_state, dims))
        self.dt_projs_weight = nn.Parameter(torch.empty(1, dims, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(1, dims))
        self.A_logs = nn.Parameter(torch.empty(dims, d_state))
        self.Ds = nn.Parameter(torch.empty(dims))
        self.out_norm = nn.LayerNorm(dims)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    @torch.no_grad()
    def reset_scan_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        """Mamba's initialisation of the scan parameters (the official one)."""
        dims = self.Ds.numel()
        bound = 1 / math.sqrt(dims)  # nn.Linear's default, as the official x_proj is created by one
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-self.dt_rank**-0.5, self.dt_rank**-0.5)
        # Step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus.
        dt = torch.exp(torch.rand(dims) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_((dt + torch.log(-torch.expm1(-dt))).unsqueeze(0))
        d_state = self.A_logs.shape[1]
        self.A_logs.copy_(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(dims, d_state))
        self.Ds.fill_(1.0)


def _recording_cuda_graph():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _ReusesWeights(nn.Module):
    """A module whose forward first derives weights from its parameters (packed, cast, assembled). Where no
    gradient can reach them (inference, frozen stages) they are kept and reused while the parameters are
    unchanged: rebuilding them is several launches per module at every forward."""

    def __init__(self):
        super().__init__()
        self._derived_weights = None  # (key, weights)

    def _derived(self, params, dtype, build):
        # While a CUDA graph is recorded the weights must be derived inside it: a kept copy would be baked
        # into the graph and go stale when the parameters change.
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or _recording_cuda_graph():
            self._derived_weights = None
            return build()
        # Any in-place change (optimizer step, load_state_dict) bumps a tensor's version; replacing .data
        # changes its storage.
        key = (dtype, *((p.data_ptr(), p._version) for p in params))
        if self._derived_weights is None or self._derived_weights[0] != key:
            self._derived_weights = (key, build())
        return self._derived_weights[1]

    def _apply(self, fn, *args, **kwargs):
        self._derived_weights = None  # .to()/.cuda()/.half(): don't keep the old copies alive
        return super()._apply(fn, *args, **kwargs)


class GroupMambaLayer(_ReusesWeights):
    """Modulated group Mamba layer: 4 channel groups, each scanned in its own direction, channel affinity.

    Args:
        dims (int): channels (divisible by 4).
        reduction (int): channel-affinity bottleneck ratio.
    """

    def __init__(self, dims, reduction=16):
        super().__init__()
        group_dims = dims // NUM_GROUPS
        self.norm = nn.LayerNorm(dims)
        self.fc1 = nn.Linear(dims, dims // reduction)
        self.fc2 = nn.Linear(dims // reduction, dims)
        for g in range(NUM_GROUPS):
            self.add_module(f'mamba_g{g + 1}', ScanGroupParameters(group_dims))
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dims, dims)
        self._packing = _LayerPacking(self)

    @property
    def scan_groups(self):
        return [getattr(self, f'mamba_g{g + 1}') for g in range(NUM_GROUPS)]

    def forward(self, x):
        """x: ``(B, H, W, C)`` -> ``(B, H, W, C)``, in the compute dtype (autocast's, or x's)."""
        batch, height, width, dims = x.shape
        dtype = _compute_dtype(x)
        (in_proj, delta_proj, bc_proj, out_proj, fc1_w, fc1_b, fc2_w, fc2_b, proj_w, proj_b, conv_w, conv_b,
         delta_bias, A, D, out_norm_w, out_norm_b) = self._grouped_weights(dtype)

        x = self._norm(x, dtype)
        affinity = torch.sigmoid(F.linear(F.relu(F.linear(x.mean((1, 2)), fc1_w, fc1_b)), fc2_w, fc2_b))
        # One projection for (u, z): u is read in place by the conv and z by the fused norm, both as column
        # slices, and backward joins their gradients in one copy.
        u, z = F.linear(x, in_proj).split(dims, dim=-1)
        u = depthwise_conv_act(u, conv_w, conv_b, 'silu').reshape(batch, height * width, dims)
        b, c = F.linear(u, bc_proj).split(NUM_GROUPS, dim=-1)  # read in place by the scan
        y = selective_scan(u, F.linear(u, delta_proj), A, b, c, D, delta_bias, (height, width))

        # Each group's out_norm normalises over that group's channels only; fused with the SiLU(z) gate. Both
        # norms come with the linear layer after them, so that their outputs need not be kept for backward.
        y = gated_group_norm_linear(y.view(batch, height, width, dims), z, out_norm_w, out_norm_b, NUM_GROUPS,
                                    self.mamba_g1.out_norm.eps, out_proj)
        # skip_scale and the channel affinity are one scale per (image, channel), applied with x inside the
        # output LayerNorm's pass (the same LayerNorm as at the input, as in the official model).
        return modulated_layer_norm_linear(y, x, self.skip_scale * affinity, self.norm.weight, self.norm.bias,
                                           self.norm.eps, proj_w, proj_b)

    def _norm(self, x, dtype):
        return layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, dtype)

    def _grouped_weights(self, dtype):
        params = self._packing.gather(self)
        return self._derived(params, dtype, lambda: GroupedLayerWeights.apply(dtype, self._packing, *params))


class DepthwiseConv(nn.Module):
    """Holds the FFN's 3x3 depthwise conv under the official key (``mlp.dwconv.dwconv``); run by ConvFFN."""

    def __init__(self, dims):
        super().__init__()
        self.dwconv = nn.Conv2d(dims, dims, 3, padding=1, groups=dims)


class ConvGeluLinearFn(torch.autograd.Function):
    """``linear(gelu(dwconv(h)))`` that keeps only ``h`` for backward.

    The FFN's hidden maps (8x the channels in stages 1-2) are the largest activations of the model, and plain
    autograd keeps three of them (the conv's, the GELU's and the linear layer's inputs). This keeps one; the
    backward recomputes the conv and GELU inside the fused depthwise-conv backward, which also returns the
    hidden map for the linear layer's weight gradient. The linear layer's matmul is not recomputed.
    ``weight``/``bias`` come already in the compute dtype (see :class:`CastParameters`).
    """

    @staticmethod
    def forward(ctx, h, conv_weight, conv_bias, weight, bias):
        ctx.save_for_backward(h, conv_weight, conv_bias, weight)
        ctx.bias_dtype = bias.dtype
        return F.linear(dwconv_act_forward(h, conv_weight, conv_bias, 'gelu'), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, conv_weight, conv_bias, weight = ctx.saved_tensors
        grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])
        # h, weight and the output share the compute dtype (weight comes cast, see CastParameters).
        grad_hidden = (grad_out2 @ weight).view(h.shape)
        grad_h, grad_conv_weight, grad_conv_bias, hidden = dwconv_act_backward(
            grad_hidden, h, conv_weight, conv_bias, 'gelu', need_output=True, reuse_dout=True)
        grad_weight = grad_out2.t() @ hidden.reshape(-1, hidden.shape[-1])
        grad_bias = grad_out2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_h, grad_conv_weight, grad_conv_bias, grad_weight, grad_bias


class ConvFFN(_ReusesWeights):
    """FFN with a depthwise conv between its two linear layers (PVTv2 style), after the block's LayerNorm.

    The norm (the block's ``norm2``, under its official key) is passed in and run here with ``fc1``, so that
    its output need not be kept for backward.
    """

    def __init__(self, dims, hidden_dims):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.dwconv = DepthwiseConv(hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)

    def forward(self, x, norm):
        """``fc2(gelu(dwconv(fc1(norm(x)))))``; x ``(B, H, W, C)``."""
        dtype = _compute_dtype(x)
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        fc1_w, fc1_b, fc2_w, fc2_b = self._derived(params, dtype, lambda: _cast_parameters(dtype, *params))
        h = layer_norm_linear(x, norm.weight, norm.bias, norm.eps, dtype, fc1_w, fc1_b)
        conv = self.dwconv.dwconv
        if torch.is_grad_enabled() and h.requires_grad:
            return ConvGeluLinearFn.apply(h, conv.weight, conv.bias, fc2_w, fc2_b)
        # Nothing is kept for backward without grad: the plain ops are the same computation.
        return F.linear(depthwise_conv_act(h, conv.weight, conv.bias, 'gelu'), fc2_w, fc2_b)


class GroupMambaBlock(nn.Module):
    """``x + DropPath(GroupMambaLayer(x))``, then ``x + DropPath(ConvFFN(norm2(x)))``; channels-last."""

    def __init__(self, dims, mlp_ratio, drop_path=0.0, with_cp=False):
        super().__init__()
        self.attn = GroupMambaLayer(dims)
        self.norm2 = nn.LayerNorm(dims, eps=STAGE_NORM_EPS)
        self.mlp = ConvFFN(dims, int(dims * mlp_ratio))
        self.drop_path = drop_path
        self.with_cp = with_cp

    def _add_branch(self, x, branch):
        """``x + DropPath(branch)``: stochastic depth as a per-image mask folded into a single addcmul
        (mmcv's DropPath plus the add take five launches forward, this two)."""
        if not (self.training and self.drop_path > 0):
            return x + branch
        keep = 1 - self.drop_path
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return torch.addcmul(x, branch, mask, value=1 / keep)

    def _forward(self, x):
        x = self._add_branch(x, self.attn(x))
        return self._add_branch(x, self.mlp(x, self.norm2))

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ConvStem(nn.Module):
    """Three convs (7x7 s2, 3x3, 3x3) with BN and ReLU, then a 3x3 s2 projection and LayerNorm: /4."""

    def __init__(self, in_channels, hidden_dims, out_dims, norm_cfg):
        super().__init__()
        layers = []
        for i, kernel in enumerate((7, 3, 3)):
            layers += [
                nn.Conv2d(in_channels if i == 0 else hidden_dims, hidden_dims, kernel, stride=2 if i == 0 else 1,
                          padding=kernel // 2, bias=False),
                build_norm_layer(norm_cfg, hidden_dims)[1],
                nn.ReLU(inplace=True),
            ]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden_dims, out_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dims)

    def forward(self, x):
        """x: NCHW image -> ``(B, H/4, W/4, C)``."""
        # Channels-last memory lets cuDNN run the BatchNorms and convs without NCHW<->NHWC conversions, and
        # the projection's output is then already the channels-last map the stages work on.
        x = x.contiguous(memory_format=torch.channels_last)
        return apply_layer_norm(self.norm, _to_nhwc(self.proj(self.conv(x))))


class Downsample(nn.Module):
    """3x3 stride-2 conv and LayerNorm between stages, channels-last in and out."""

    def __init__(self, in_dims, out_dims):
        super().__init__()
        self.proj = nn.Conv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dims)

    def forward(self, x):
        return apply_layer_norm(self.norm, _to_nhwc(self.proj(_to_nchw(x))))


@MODELS.register_module()
class GroupMamba(BaseModule):
    """GroupMamba backbone for detection, segmentation and classification.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` or a dict with keys ``stem_hidden_dim``,
            ``embed_dims``, ``mlp_ratios`` and ``depths``.
        in_channels (int): image channels.
        out_indices (Sequence[int]): stages (0-3) whose normalised maps are returned, as NCHW tensors.
        drop_path_rate (float): stochastic depth, rising linearly over all blocks.
        frozen_stages (int): -1 trains everything; 0 freezes the stem (``patch_embed1``); k >= 1 freezes
            stages 1..k (their ``patch_embed``, blocks and ``norm``).
        norm_eval (bool): keep the stem's BatchNorm layers in eval mode while training.
        with_cp (bool): gradient checkpointing of every block (saves memory, costs a recompute).
        norm_cfg (dict): norm of the conv stem (``BN``; ``SyncBN`` for multi-GPU training).
        cuda_graph (bool): replay forward and backward from CUDA graphs recorded per input size
            (:mod:`mmgroupmamba.models.cuda_graph`). A step then costs the host one launch instead of
            thousands; worth it where inputs come in a few fixed sizes (classification, segmentation crops,
            fixed-size detection). Other inputs run eagerly, with a log line.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` for an official
            GroupMamba ImageNet checkpoint (raw, under ``model``/``state_dict``, with or without ``backbone.``).
    """

    def __init__(self,
                 arch='tiny',
                 in_channels=3,
                 out_indices=(0, 1, 2, 3),
                 drop_path_rate=0.0,
                 frozen_stages=-1,
                 norm_eval=False,
                 with_cp=False,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 cuda_graph=False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if cuda_graph and with_cp:
            # Checkpointing's recomputation saves and restores the RNG state, which a recorded graph cannot.
            raise ValueError('GroupMamba: cuda_graph=True and with_cp=True cannot be combined')
        self.arch = resolve_arch(arch)
        embed_dims, depths = self.arch['embed_dims'], self.arch['depths']
        self.num_stages = len(depths)
        out_indices = tuple(out_indices)
        for i in out_indices:
            if not 0 <= i < self.num_stages:
                raise ValueError(f'GroupMamba: out_indices must lie in [0, {self.num_stages - 1}], got {out_indices}')
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'GroupMamba: frozen_stages must lie in [-1, {self.num_stages}], got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.embed_dims = embed_dims

        block_drop = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(self.num_stages):
            if i == 0:
                patch_embed = ConvStem(in_channels, self.arch['stem_hidden_dim'], embed_dims[0], norm_cfg)
            else:
                patch_embed = Downsample(embed_dims[i - 1], embed_dims[i])
            first = sum(depths[:i])
            blocks = nn.ModuleList(
                GroupMambaBlock(embed_dims[i], self.arch['mlp_ratios'][i], block_drop[first + j], with_cp)
                for j in range(depths[i]))
            self.add_module(f'patch_embed{i + 1}', patch_embed)
            self.add_module(f'block{i + 1}', blocks)
            self.add_module(f'norm{i + 1}', nn.LayerNorm(embed_dims[i], eps=STAGE_NORM_EPS))
        self.apply(init_official_weights)
        self._freeze_stages()
        self._cuda_graphs = CudaGraphs('GroupMamba') if cuda_graph else None

    def init_weights(self):
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            load_backbone_checkpoint(self, self.init_cfg['checkpoint'], prefix=self.init_cfg.get('prefix'))
            self._is_init = True
        else:
            super().init_weights()

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        modules = [self.patch_embed1]
        for i in range(1, self.frozen_stages + 1):
            modules += [getattr(self, f'{name}{i}') for name in ('patch_embed', 'block', 'norm')]
        for module in modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward_stage(self, i, x):
        """Stage ``i`` (0-based) without its norm: downsampling (or the stem) and blocks, channels-last out."""
        x = getattr(self, f'patch_embed{i + 1}')(x)
        for block in getattr(self, f'block{i + 1}'):
            x = block(x)
        return x

    def _apply(self, fn, *args, **kwargs):
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()  # recorded graphs point at the old tensors
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        check_image_batch(x, self.patch_embed1.conv[0].weight, in_channels=self.patch_embed1.conv[0].in_channels)
        if self._cuda_graphs is not None:
            return self._cuda_graphs(self, self._forward, x)
        return self._forward(x)

    def _forward(self, x):
        outs = []
        for i in range(self.num_stages):
            normed = apply_layer_norm(getattr(self, f'norm{i + 1}'), self.forward_stage(i, x))
            if i in self.out_indices:
                outs.append(_to_nchw(normed).contiguous())
            # The official model feeds the normalised map of stages 1-3 into the next stage.
            x = normed
        return tuple(outs)


def init_official_weights(module):
    """The official initialisation: truncated normal linears, fan-out normal convs, Mamba's scan init."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, ScanGroupParameters):
        module.reset_scan_parameters()

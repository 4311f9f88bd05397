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

    out_type='featmap' returns those maps (NCHW), 'avg_featmap' their spatial means ``(B, C_i)``, and
    'cls_token' the official classifier's vector ``(B, C_4)``:
          block4's tokens (before norm4) -> mean -> post_network (one ClassBlock) -> norm4

    block:  x = x + DropPath(GroupMambaLayer(x));   x = x + DropPath(ConvFFN(norm2(x)))
            (each add done in the pass of the LayerNorm that reads the sum next: norm2, the next block's input
            norm, the stage's norm; kernels.residual_layer_norm)

    GroupMambaLayer (C channels, 4 groups of d = C/4):
        x = LayerNorm(x)
        per group g: in_proj -> (u, z); u = SiLU(dwconv3x3(u)); project u to (delta, B, C);
                     y = selective scan of u over the map in SCAN_DIRECTIONS[g] order (d_state=1);
                     y = out_norm(y) * SiLU(z); out_proj
        y = concat(groups) * skip_scale * x * sigmoid(fc2(relu(fc1(mean_hw(x)))))   (channel affinity;
            skip_scale * sigmoid(...) with the mean is one fused op on x, in fp32: kernels.channel_affinity)
        return proj(LayerNorm(y))          (the same LayerNorm as at the input, as in the official model)

Parameters are stored the way the kernels use them: the four groups' scan parameters packed together, one
tensor per kind (``in_proj_weight`` ``(4, 2d, d)``, ``A_logs`` ``(C, 1)``, ...; VMamba's SS2D layout), and
every group runs in the same launches: one linear layer for all groups' projections (their block-diagonal
weights), one depthwise conv, one scan. ``state_dict()`` gives the official per-group keys and shapes
(``block1.0.attn.mamba_g1.x_proj_weight`` ...) and ``load_state_dict`` takes them, through
:func:`official_to_packed` / :func:`packed_to_official`; official checkpoints load unchanged. Tensors inside a
stage are channels-last ``(B, H, W, C)``. A stage whose width is not a multiple of 16 (stage 3 of T and S: 348;
of B: 424) stores its maps padded, each scan group's channels followed by zero channels (348 as 352, 424 as 432),
so that its matmuls run cuBLAS's fast kernels and the Triton kernels move whole vectors (``kernels/layout.py``,
``channel_multiple``); its parameters, outputs and gradients are the unpadded model's.

The fused ops (``mmgroupmamba.kernels``) are PyTorch custom ops, so the backbone runs eagerly (plain eager calls run the
ops' implementations without the dispatcher's host cost per call: ``kernels/ops_util.py``), under
``torch.compile`` (``compile=True``: one graph, symbolic sizes) and from CUDA graphs (``cuda_graph=True``,
:mod:`mmgroupmamba.models.cuda_graph`) with the same results.
"""
import functools
import math
import re

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
from mmgroupmamba.kernels import (
    SCAN_DIRECTIONS,
    channel_affinity,
    depthwise_conv_act,
    depthwise_conv_act_linear,
    gated_group_norm,
    gated_group_norm_linear,
    layer_norm,
    layer_norm_linear,
    modulated_layer_norm_linear,
    residual_layer_norm,
    residual_layer_norm_linear,
    selective_scan,
)
from mmgroupmamba.kernels.layout import (
    CHANNEL_MULTIPLE,
    StoredParameters,
    as_flat,
    pad_blocks,
    pad_groups,
    split_with_gaps,
    stored_channels,
    unpad_groups,
    with_gaps,
)
from mmgroupmamba.kernels.ops_util import traced
from mmgroupmamba.models.compiled import CompiledForward
from mmgroupmamba.models.conv import OpaqueConv2d
from mmgroupmamba.models.cuda_graph import CudaGraphs
from mmgroupmamba.models.inputs import check_image_batch

ARCH_SETTINGS = {
    'tiny': dict(stem_hidden_dim=32, embed_dims=[64, 128, 348, 448], mlp_ratios=[8, 8, 4, 4], depths=[3, 4, 9, 3]),
    'small': dict(stem_hidden_dim=64, embed_dims=[64, 128, 348, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 4, 16, 3]),
    'base': dict(stem_hidden_dim=64, embed_dims=[96, 192, 424, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 6, 21, 3]),
    # Not a paper variant: the demos' and tests' backbone, small enough to train on a CPU in minutes.
    'mini': dict(stem_hidden_dim=16, embed_dims=[32, 64, 96, 128], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 2, 1]),
}
ARCH_KEYS = ('stem_hidden_dim', 'embed_dims', 'mlp_ratios', 'depths')
OUT_TYPES = ('featmap', 'avg_featmap', 'cls_token')
CUDA_GRAPH_MODES = (False, True, 'train')
# Inductor options the compiled backbone (``compile=True``) gets unless ``compile=dict(options=...)`` names them.
# On an H200 (twelfth session, README) they took GroupMamba-T's compiled training step from 1557 to 1866 img/s,
# its peak reserved memory from 11.0 to 7.2 GiB and its det step from 2555 to 1612 launches: the block cast's
# backward concatenation of 20 pieces becomes one kernel instead of a copy per piece, and independent small
# kernels launch together. They did not help mmdet's Swin-T, so they are GroupMamba's, not every backbone's.
# static_launch_user_defined_triton_kernels: Inductor launches our own Triton kernels (415 a det step) through its
# static CUDA launcher, as it does its generated ones, instead of Triton's Python launcher (off by default in torch
# 2.11-2.14); on an H200 the compiled det step's host time fell from 55.3 to 42.4 ms, its wall from 58.3 to 44.4
# (twentieth session, README). Swin-T has no such kernels.
COMPILE_INDUCTOR_DEFAULTS = dict(force_pointwise_cat=True, combo_kernels=True,
                                 static_launch_user_defined_triton_kernels=True)
NUM_GROUPS = len(SCAN_DIRECTIONS)
# The official model builds its stage norms and FFN norms with eps=1e-6, and every other LayerNorm (stem,
# downsampling, the layer's own norm and the scan's out_norm) with PyTorch's default 1e-5.
STAGE_NORM_EPS = 1e-6


def arch_name(arch):
    """The name in ``ARCH_SETTINGS`` of ``arch`` (a name or an arch dict), or ``None`` for another dict."""
    resolved = resolve_arch(arch)
    return next((name for name, settings in ARCH_SETTINGS.items() if settings == resolved), None)


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


# ----------------------------------------------------------------------------------------------------------
# Official per-group keys <-> packed parameters
# ----------------------------------------------------------------------------------------------------------
# Packed name -> (official name inside mamba_g{g}, how the G official tensors join): 'stack' adds a leading
# group dim (their own leading dim of 1 dropped where they have one), 'cat' concatenates along dim 0.
PACKED_PARAMS = {
    'x_proj_weight': ('x_proj_weight', 'cat'),  # (1, R+2, d) each -> (G, R+2, d)
    'dt_projs_weight': ('dt_projs_weight', 'cat'),  # (1, d, R) -> (G, d, R)
    'dt_projs_bias': ('dt_projs_bias', 'cat'),  # (1, d) -> (G, d)
    'A_logs': ('A_logs', 'cat'),  # (d, 1) -> (C, 1)
    'Ds': ('Ds', 'cat'),  # (d,) -> (C,)
    'out_norm.weight': ('out_norm.weight', 'cat'),  # (d,) -> (C,)
    'out_norm.bias': ('out_norm.bias', 'cat'),
    'in_proj_weight': ('in_proj.weight', 'stack'),  # (2d, d) -> (G, 2d, d)
    'conv2d.weight': ('conv2d.weight', 'cat'),  # (d, 1, 3, 3) -> (C, 1, 3, 3)
    'conv2d.bias': ('conv2d.bias', 'cat'),
    'out_proj_weight': ('out_proj.weight', 'stack'),  # (d, d) -> (G, d, d)
}
_OFFICIAL_KEY = re.compile(r'^(?P<layer>.*?)mamba_g(?P<group>[1-4])\.(?P<name>.+)$')
_OFFICIAL_NAMES = {official: packed for packed, (official, _) in PACKED_PARAMS.items()}


def official_to_packed(state_dict):
    """A state dict with official per-group keys (``...attn.mamba_g1.in_proj.weight``) -> the same with each
    layer's groups packed (``...attn.in_proj_weight``); every other key passes unchanged. Pure: the input is
    not modified. Raises if a layer has some of its groups' tensors but not all."""
    out, groups = {}, {}
    for key, value in state_dict.items():
        match = _OFFICIAL_KEY.match(key)
        if match is None or match['name'] not in _OFFICIAL_NAMES:
            out[key] = value
            continue
        packed_key = match['layer'] + _OFFICIAL_NAMES[match['name']]
        groups.setdefault(packed_key, {})[int(match['group']) - 1] = value
        out.setdefault(packed_key, None)  # keeps the layer's keys where the first group's were
    for packed_key, tensors in groups.items():
        if sorted(tensors) != list(range(NUM_GROUPS)):
            missing = [f'mamba_g{g + 1}' for g in range(NUM_GROUPS) if g not in tensors]
            raise KeyError(f'GroupMamba checkpoint: {packed_key} needs all {NUM_GROUPS} groups; missing {missing}')
        how = PACKED_PARAMS[packed_key[len(packed_key) - len(_local_name(packed_key)):]][1]
        parts = [tensors[g] for g in range(NUM_GROUPS)]
        out[packed_key] = torch.stack(parts) if how == 'stack' else torch.cat(parts)
    return out


def _local_name(packed_key):
    return next(name for name in PACKED_PARAMS if packed_key.endswith(name))


def packed_to_official(state_dict, prefix=None):
    """The inverse of :func:`official_to_packed`: each packed tensor becomes its four groups' official tensors,
    as views of it (in-place updates through them, as by EMA, reach it). With ``prefix`` (a layer's own
    prefix), only that layer's keys are converted; without, every key whose name after its last ``attn.`` is a
    packed name."""
    out = {}
    for key, value in state_dict.items():
        if prefix is None:
            layer, sep, local = key.rpartition('attn.')
            layer += sep
        else:
            layer, local = prefix, (key[len(prefix):] if key.startswith(prefix) else None)
        if local not in PACKED_PARAMS:
            out[key] = value
            continue
        official, how = PACKED_PARAMS[local]
        parts = value.unbind(0) if how == 'stack' else value.chunk(NUM_GROUPS, 0)
        for g, part in enumerate(parts):
            out[f'{layer}mamba_g{g + 1}.{official}'] = part
    return out


def lay_on_diagonal(matrices, blocks):
    """Copies ``(..., G, m, n)`` blocks onto the diagonal blocks of ``matrices`` ``(..., G*m, G*n)``, in one copy.

    One dense matmul with a block-diagonal weight beats G small ones (and G launches). Run without autograd:
    :class:`_BlockDiagonalProjections` takes the gradients.
    """
    *lead, groups, rows, cols = blocks.shape
    diagonal = matrices.view(*lead, groups, rows, groups, cols).diagonal(dim1=len(lead), dim2=len(lead) + 2)
    diagonal.copy_(blocks.movedim(-3, -1))  # (..., m, n, G)


# Where cast_together starts each tensor in its buffer: a multiple of 128 bytes, so that every part is as aligned
# as a tensor of its own. cuBLAS picks slower kernels for matrices at 2- or 4-byte offsets (on an H200 the
# eager step's fp16 GEMMs of such weights ran in sm75 kernels, 2.2 ms of 36), and Triton specialises its kernels
# on 16-byte alignment.
CAST_ALIGN_BYTES = 128


class _CastTogether(torch.autograd.Function):
    """``params`` as aligned views of one buffer in ``dtype``, with a hand-written backward: autograd's own
    (through ``split``) would zero-fill a gradient for every padding piece, a fill launch each."""

    @staticmethod
    def forward(ctx, dtype, pads, *params):
        # The padding only places the next part; its values are never read, so it is left unfilled.
        padding = params[0].new_empty(max(pads))
        flat = torch.cat(with_gaps([as_flat(p) for p in params], pads, padding))
        ctx.set_materialize_grads(False)  # a part that gets no gradient costs a zero fill only then
        ctx.dtype, ctx.source_dtype, ctx.device, ctx.pads = dtype, flat.dtype, flat.device, pads
        ctx.shapes = [p.shape for p in params]
        return tuple(split_with_gaps(flat.to(dtype), ctx.shapes, pads))

    @staticmethod
    def backward(ctx, *grads):
        # A part without a gradient (a part no loss reached, a frozen parameter) keeps an unfilled place, like
        # the padding, and its parameter gets None from here.
        unfilled = torch.empty(max(s.numel() + pad for s, pad in zip(ctx.shapes, ctx.pads)), dtype=ctx.dtype,
                               device=ctx.device)
        pieces = [unfilled[:shape.numel()] if grad is None else as_flat(grad) for grad, shape in zip(grads, ctx.shapes)]
        # The same layout as forward's: every gradient starts as aligned as the buffer of its own it replaces.
        flat = torch.cat(with_gaps(pieces, ctx.pads, unfilled)).to(ctx.source_dtype)
        return None, None, *(None if grad is None else part
                             for grad, part in zip(grads, split_with_gaps(flat, ctx.shapes, ctx.pads)))


def cast_together(params, dtype):
    """``params`` in ``dtype``: themselves where they are already in it, else cast together under autocast, in
    one concatenation and one cast forward (and one concatenation and one cast backward, each parameter's
    gradient a view of its result), where autocast and the fused linear layers would cast each on its own,
    both ways (a training step is bound by its host's launches). Each part starts at a multiple of
    ``CAST_ALIGN_BYTES`` in the buffer (unfilled padding between)."""
    if all(p.dtype == dtype for p in params):
        return params
    align = max(1, CAST_ALIGN_BYTES // dtype.itemsize)
    pads = tuple(-p.numel() % align for p in params)
    return list(_CastTogether.apply(dtype, pads, *params))


def apply_layer_norm(norm, x, out_channels=None):
    """``norm(x)`` for an ``nn.LayerNorm`` over the last dim, through the blocks' LayerNorm kernel on CUDA, with
    PyTorch's dtypes (:func:`_norm_dtype`). ``x`` and the output (``out_channels`` columns, default x's) may be
    padded (``kernels/layout.py``): the stage boundaries pad and unpad here."""
    return layer_norm(x, norm.weight, norm.bias, norm.eps, _norm_dtype(x), out_channels)


def _norm_dtype(x):
    """The dtype ``nn.LayerNorm`` gives for ``x``: fp32 under autocast, else None (x's own)."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else None


def _compute_dtype(x):
    """The dtype the layer's matmuls run in: autocast's, when it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _to_nchw(x):
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x):
    return x.permute(0, 2, 3, 1)


def _batched_product(a, b):
    """``a @ b`` for ``(G, m, k)`` and ``(G, k, n)``: the step sizes' projection and its gradients, a few
    microseconds of GPU work each. Eagerly one ``bmm`` launch. Traced (torch.compile) a broadcast product summed
    over ``k``, which Inductor fuses into the kernels around it (unrolled into a pointwise kernel for ``k`` up to 8),
    where a ``bmm`` would stay a library call: 57 of them in GroupMamba-T's compiled step, 20-40 us of host each."""
    if traced((a, b)):
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return torch.bmm(a.flatten(0, -3), b.flatten(0, -3)).view(*a.shape[:-1], b.shape[-1])


class _BlockDiagonalProjections(torch.autograd.Function):
    """:meth:`GroupMambaLayer.projections` with a hand-written backward.

    Forward, five ops: the square blocks of three projections are stacked, and laid with B's and C's rows on
    the diagonals of one zero-filled buffer, the step sizes' projection next to B's and C's. Backward, each
    packed weight's gradient is read straight off the diagonal blocks of its projection's gradient, where
    autograd's own went back through the splits, the diagonal copies, the concatenation and the transposes:
    two launches fewer a layer in the compiled step (``benchmarks/compiled_kernels.py``)."""

    @staticmethod
    def forward(ctx, in_proj_weight, x_proj_weight, dt_projs_weight, out_proj_weight):
        # Every input has a leading dim of blocks (n, G, ...): a stage's blocks are built together.
        dt_rank = dt_projs_weight.shape[-1]
        dt_rows, bc_rows = x_proj_weight.split([dt_rank, 2], dim=-2)
        ctx.save_for_backward(dt_projs_weight, dt_rows)
        blocks, groups, group_dims, _ = out_proj_weight.shape
        channels = groups * group_dims
        square = torch.cat([in_proj_weight.unflatten(-2, (2, -1)).transpose(1, 2),  # (n, 2, G, d, d): u, z
                            out_proj_weight.unsqueeze(1),
                            _batched_product(dt_projs_weight, dt_rows).unsqueeze(1)], dim=1)
        # Rows: in_proj (u, z), out_proj, then delta's projection and B's and C's rows as one matrix: one
        # matmul of u for the three instead of two, each way.
        weights = square.new_zeros(blocks, 4 * channels + 2 * groups, channels)
        lay_on_diagonal(weights[:, :4 * channels].view(blocks, 4, channels, channels), square)
        lay_on_diagonal(weights[:, 4 * channels:].view(blocks, 2, groups, channels),
                        bc_rows.transpose(1, 2).unsqueeze(-2))
        in_proj, out_proj, delta_bc_proj = weights.split([2 * channels, channels, channels + 2 * groups], dim=1)
        return in_proj, delta_bc_proj, out_proj

    @staticmethod
    def backward(ctx, grad_in_proj, grad_delta_bc_proj, grad_out_proj):
        dt_projs_weight, dt_rows = ctx.saved_tensors
        blocks, groups, group_dims, _ = dt_projs_weight.shape
        grad_delta_proj, grad_bc_proj = grad_delta_bc_proj.split([groups * group_dims, 2 * groups], dim=1)

        def diagonal_blocks(grad, parts):
            """``(n, parts * G * m, G * d)`` -> its diagonal blocks ``(n, G, parts, m, d)``."""
            diagonal = grad.view(blocks, parts, groups, -1, groups, group_dims).diagonal(dim1=2, dim2=4)
            return diagonal.permute(0, 4, 1, 2, 3)

        grad_delta = diagonal_blocks(grad_delta_proj, 1)[:, :, 0]  # (n, G, d, d), of dt_projs @ dt_rows
        grad_x_proj = torch.cat([_batched_product(dt_projs_weight.transpose(-1, -2), grad_delta),  # dt rows
                                 diagonal_blocks(grad_bc_proj, 2)[:, :, :, 0]], dim=2)  # B and C rows
        grad_dt_projs = _batched_product(grad_delta, dt_rows.transpose(-1, -2))
        return (diagonal_blocks(grad_in_proj, 2).flatten(2, 3), grad_x_proj, grad_dt_projs,
                diagonal_blocks(grad_out_proj, 1)[:, :, 0])


class GroupLayerNorm(nn.LayerNorm):
    """LayerNorm over each of ``groups`` equal channel groups on its own (the scan groups' ``out_norm``s, packed:
    weight and bias ``(C,)``). A LayerNorm to optimizers' norm rules."""

    def __init__(self, channels, groups, eps=1e-5):
        super().__init__(channels, eps=eps)
        self.groups = groups

    def forward(self, y, gate=None):
        """``(per-group LayerNorm(y) * weight + bias) * silu(gate)`` (no gate when ``gate`` is None)."""
        return gated_group_norm(y, gate, self.weight, self.bias, self.groups, self.eps)


class GroupMambaLayer(nn.Module):
    """Modulated group Mamba layer: 4 channel groups, each scanned in its own direction, channel affinity.

    Args:
        dims (int): channels C (divisible by 4).
        reduction (int): channel-affinity bottleneck ratio.
        stored_dims (int, optional): the channels its maps are stored in (``kernels/layout.py``: each group's
            channels followed by zeros, so that the matmuls get K and N that cuBLAS's fast kernels take);
            default ``dims``. The parameters keep their shapes either way.
    """

    def __init__(self, dims, reduction=16, stored_dims=None):
        super().__init__()
        group_dims = dims // NUM_GROUPS
        self.stored_dims = stored_dims or dims
        self.dt_rank = math.ceil(group_dims / 16)
        self.norm = nn.LayerNorm(dims)
        self.fc1 = nn.Linear(dims, dims // reduction)
        self.fc2 = nn.Linear(dims // reduction, dims)
        # The 4 groups' scan parameters (rows of x_proj: dt, B, C).
        self.in_proj_weight = nn.Parameter(torch.empty(NUM_GROUPS, 2 * group_dims, group_dims))  # rows (u, z)
        self.conv2d = nn.Conv2d(dims, dims, 3, padding=1, groups=dims)
        self.x_proj_weight = nn.Parameter(torch.empty(NUM_GROUPS, self.dt_rank + 2, group_dims))
        self.dt_projs_weight = nn.Parameter(torch.empty(NUM_GROUPS, group_dims, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(NUM_GROUPS, group_dims))
        self.A_logs = nn.Parameter(torch.empty(dims, 1))
        self.Ds = nn.Parameter(torch.empty(dims))
        self.out_norm = GroupLayerNorm(dims, NUM_GROUPS)
        self.out_proj_weight = nn.Parameter(torch.empty(NUM_GROUPS, group_dims, group_dims))
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dims, dims)
        self.reset_scan_parameters()
        self.register_state_dict_post_hook(_state_dict_to_official)
        self.register_load_state_dict_pre_hook(_official_state_dict_to_packed)

    @torch.no_grad()
    def reset_scan_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        """The official initialisation of the groups' parameters (Mamba's for the scan's)."""
        group_dims = self.Ds.numel() // NUM_GROUPS
        trunc_normal_(self.in_proj_weight, std=0.02)  # official: nn.Linear layers
        trunc_normal_(self.out_proj_weight, std=0.02)
        bound = 1 / math.sqrt(group_dims)  # nn.Linear's default, as the official x_proj is created by one
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-self.dt_rank**-0.5, self.dt_rank**-0.5)
        # Step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus.
        dt = torch.exp(torch.rand(self.dt_projs_bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs.zero_()  # log(1): d_state = 1
        self.Ds.fill_(1.0)

    def matmul_params(self):
        """The parameters the layer's matmuls read in the compute dtype, in the order ``forward``'s ``weights``
        lists them: the packed ``in_proj``, ``x_proj``, ``dt_projs`` and ``out_proj`` weights, ``proj``'s weight
        and bias. Not the channel affinity's ``fc1`` and ``fc2``: its op reads them in fp32, as they are."""
        return [self.in_proj_weight, self.x_proj_weight, self.dt_projs_weight, self.out_proj_weight,
                self.proj.weight, self.proj.bias]

    def projections(self, in_proj_weight, x_proj_weight, dt_projs_weight, out_proj_weight):
        """The groups' projections as block-diagonal matrices over all channels, from the packed weights:
        ``in_proj`` ``(2C, C)`` (rows: u of all groups, then z), ``delta_bc_proj`` ``(C + 2G, C)`` (the step
        sizes' projection, dt_proj folded into x_proj's dt rows, then x_proj's B rows and its C rows) and
        ``out_proj`` ``(C, C)``, C the channels of the weights given (a padded layer's are stored
        with zeros per group, :meth:`stored_layouts`, and so are its projections). Rebuilt at every call
        (:class:`_BlockDiagonalProjections`)."""
        one = _BlockDiagonalProjections.apply(*(w.unsqueeze(0) for w in (in_proj_weight, x_proj_weight,
                                                                           dt_projs_weight, out_proj_weight)))
        return tuple(w[0] for w in one)

    def channel_params(self):
        """The parameters read as they are (fp32): the conv's weight and bias, the scan's ``A_logs``, ``Ds`` and
        delta bias."""
        return [self.conv2d.weight, self.conv2d.bias, self.A_logs, self.Ds, self.dt_projs_bias]

    def stored_layouts(self):
        """Two lists of ``(shape, pad)``, one entry for each of :meth:`matmul_params` and of :meth:`channel_params`:
        ``pad`` lays the parameter out in the stored channels (``kernels/layout.py``), the scan weights per
        group."""
        group, rank = self.stored_dims // NUM_GROUPS, self.dt_rank

        def blocks(rows, cols):
            return functools.partial(pad_blocks, rows=rows, cols=cols)

        def in_proj(t):  # (G, 2d, d): the u rows and the z rows padded apart
            return pad_blocks(t.unflatten(1, (2, -1)), group, group).flatten(1, 2)

        matmul = [in_proj, blocks(rank + 2, group), blocks(group, rank), blocks(group, group),
                  lambda weight: self.pad(self.pad(weight, 0), 1), self.pad]
        channel = [functools.partial(self.pad, dim=0), self.pad, functools.partial(self.pad, dim=0), self.pad,
                   blocks(NUM_GROUPS, group)]
        return ([(p.shape, pad) for p, pad in zip(self.matmul_params(), matmul)],
                [(p.shape, pad) for p, pad in zip(self.channel_params(), channel)])

    def forward_weights(self, cast_params, channel_params, projections=None):
        """What ``forward`` reads, from :meth:`matmul_params` cast to the compute dtype and from
        :meth:`channel_params`, each in the stored channels: the groups' projections as block-diagonal matrices
        (``projections``, already built for a stage's blocks together, or :meth:`projections`), ``proj``'s weight and
        bias, then the fp32 ones (``A_logs`` and the delta bias flattened)."""
        *scan_weights, proj_weight, proj_bias = cast_params
        conv_weight, conv_bias, a_logs, ds, delta_bias = channel_params
        projections = self.projections(*scan_weights) if projections is None else projections
        return (*projections, proj_weight, proj_bias, conv_weight, conv_bias, a_logs.flatten(),
                ds, delta_bias.flatten())

    def pad(self, t, dim=-1):
        """``t``'s ``dim`` of ``C`` channels laid out in the stored channels (itself where they are the same)."""
        return pad_groups(t, self.stored_dims, dim)

    def forward(self, x, weights=None, normalized=False):
        """x: ``(B, H, W, C)`` -> ``(B, H, W, C)``, in the compute dtype (autocast's, or x's), C the stored
        channels. ``weights``: :meth:`forward_weights` in that dtype (:func:`build_forward_weights` builds them for
        a stage's blocks together). ``normalized``: x is already ``self.norm``'s output (a block runs that norm
        itself, with its pending residual add: :func:`add_layer_norm`)."""
        batch, height, width, stored = x.shape
        if not normalized:
            x = layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, _compute_dtype(x))
        if weights is None:
            if stored != self.Ds.numel():
                raise ValueError(f'GroupMambaLayer: a padded layer ({self.Ds.numel()} channels stored as {stored}) '
                                 f'reads its weights in the stored layout: pass GroupMambaBlock\'s')
            weights = self.forward_weights(cast_together(self.matmul_params(), x.dtype), self.channel_params())
        (in_proj, delta_bc_proj, out_proj, proj_weight, proj_bias, conv_weight, conv_bias, a_logs, ds,
         delta_bias) = weights
        # skip_scale times the channel affinity of x pooled over H and W: one scale per (image, channel), in fp32,
        # one fused op, which reads the map in the stored layout and gives the compact scale.
        scale = channel_affinity(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.skip_scale)

        # u is read in place by the conv and z by the gated norm, both as column slices of one projection.
        u, z = F.linear(x, in_proj).split(stored, dim=-1)
        u = depthwise_conv_act(u, conv_weight, conv_bias, 'silu')
        u = u.reshape(batch, height * width, stored)
        # The step sizes and B and C in one matmul, read in place by the scan as column slices.
        delta, b, c = F.linear(u, delta_bc_proj).split([stored, NUM_GROUPS, NUM_GROUPS], dim=-1)
        # Pad channels scan zeros (u is zero there) and stay zero whatever their A, D and bias (zeros here).
        y = selective_scan(u, delta, a_logs, b, c, ds, delta_bias, (height, width))
        # Each group's out_norm normalises over that group's channels only; fused with the SiLU(z) gate. Both
        # norms run with the linear layer after them, so that their outputs need not be kept for backward.
        y = gated_group_norm_linear(y.view(batch, height, width, stored), z, self.out_norm.weight,
                                    self.out_norm.bias, NUM_GROUPS, self.out_norm.eps, out_proj)
        # The scale is applied with x inside the output LayerNorm's pass (the same LayerNorm as at the input, as
        # in the official model).
        return modulated_layer_norm_linear(y, x, scale, self.norm.weight, self.norm.bias, self.norm.eps,
                                           proj_weight, proj_bias)


def _state_dict_to_official(module, state_dict, prefix, local_metadata):
    own = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    state_dict.update(packed_to_official(own, prefix))


def _official_state_dict_to_packed(module, state_dict, prefix, *args):
    own = [k for k in state_dict if k.startswith(prefix) and _OFFICIAL_KEY.match(k[len(prefix):])]
    if own:
        converted = official_to_packed({k: state_dict.pop(k) for k in own})
        state_dict.update(converted)


class DepthwiseConv(nn.Module):
    """Holds the FFN's 3x3 depthwise conv under the official key (``mlp.dwconv.dwconv``); run by ConvFFN."""

    def __init__(self, dims):
        super().__init__()
        self.dwconv = nn.Conv2d(dims, dims, 3, padding=1, groups=dims)


class ConvFFN(nn.Module):
    """FFN with a depthwise conv between its two linear layers (PVTv2 style), after the block's LayerNorm.

    The norm (the block's ``norm2``, under its official key) is passed in and run here with ``fc1``, and the
    conv + GELU with ``fc2``: only the norm's input and the conv's input are kept for backward, not the
    8x-channel hidden maps after the conv and the GELU.
    """

    def __init__(self, dims, hidden_dims, stored_dims=None):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.dwconv = DepthwiseConv(hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.stored_dims = stored_dims or dims  # as GroupMambaLayer's

    def matmul_params(self):
        """The linear layers' weights and biases, which the fused layers read in the compute dtype."""
        return [self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]

    def channel_params(self):
        """None: the FFN reads every parameter in the compute dtype (the layer's list's counterpart)."""
        return []

    def stored_layouts(self):
        """As :meth:`GroupMambaLayer.stored_layouts`: ``fc1``'s input channels and ``fc2``'s output channels are
        the stage's (the hidden ones are never padded)."""
        matmul = [functools.partial(self.pad, dim=1), lambda bias: bias, functools.partial(self.pad, dim=0), self.pad]
        return [(p.shape, pad) for p, pad in zip(self.matmul_params(), matmul)], []

    def forward_weights(self, cast_params, channel_params):
        """What ``forward`` reads: :meth:`matmul_params` in the compute dtype, then :meth:`channel_params`, each
        in the stored channels."""
        return (*cast_params, *channel_params)

    def pad(self, t, dim=-1):
        return pad_groups(t, self.stored_dims, dim)

    def forward(self, x, norm, weights=None, residual=None):
        """``(x, fc2(gelu(dwconv(fc1(norm(x))))))``, x ``(B, H, W, C)``, C the stored channels, after x's pending
        residual add where there is one (``residual``: ``(branch, mask)``, ``x + DropPath(branch)`` added in the
        norm's pass: :func:`add_layer_norm`; x itself comes back without one). ``weights``: :meth:`forward_weights`
        (:func:`build_forward_weights` builds them for a stage's blocks together)."""
        dtype = _compute_dtype(x)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights or self.forward_weights(
            cast_together(self.matmul_params(), dtype), self.channel_params())
        if residual is None:
            h = layer_norm_linear(x, norm.weight, norm.bias, norm.eps, dtype, fc1_weight, fc1_bias)
        else:
            branch, mask = residual
            x, h = residual_layer_norm_linear(x, branch, _per_image(mask), norm.weight, norm.bias, norm.eps, dtype,
                                              fc1_weight, fc1_bias)
        conv = self.dwconv.dwconv
        return x, depthwise_conv_act_linear(h, conv.weight, conv.bias, 'gelu', fc2_weight, fc2_bias)


class _AddDroppedBranch(torch.autograd.Function):
    """``x + branch * mask`` in x's dtype, with a one-launch backward: the branch's gradient is one multiply
    written in the branch's dtype, where autograd's for an ``addcmul`` with a scale would scale the mask,
    multiply and cast (three launches per branch; the eager step is bound by its host's launches)."""

    @staticmethod
    def forward(ctx, x, branch, mask):
        ctx.save_for_backward(mask)
        ctx.branch_dtype = branch.dtype
        return torch.addcmul(x, branch, mask, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        grad_branch = torch.mul(grad, mask, out=grad.new_empty(grad.shape, dtype=ctx.branch_dtype))
        return grad, grad_branch, None


def add_dropped_branch(x, branch, mask):
    """``x + DropPath(branch)``: ``mask`` is the per-image keep mask divided by the keep rate
    (:func:`draw_keep_masks`), or None where nothing drops."""
    return x + branch if mask is None else _AddDroppedBranch.apply(x, branch, mask)


def add_residual(x, residual):
    """x after its pending residual add (``residual``: ``(branch, mask)``, :func:`add_dropped_branch`'s; None:
    x), where no norm follows to do it in its pass."""
    return x if residual is None else add_dropped_branch(x, *residual)


def _per_image(mask):
    """A block's keep mask ``(B, 1, 1, 1)`` as the fused residual norms read it, ``(B,)`` (None stays None)."""
    return None if mask is None else mask.view(-1)


def add_layer_norm(x, residual, norm, out_dtype=None, out_channels=None):
    """``(x, norm(x))`` after x's pending residual add, ``x = x + DropPath(branch)`` for ``residual = (branch,
    mask)`` (:func:`add_dropped_branch`'s), done in the norm's pass (``kernels.residual_layer_norm``: the sum is
    written once and not read back); ``residual`` None: x as it is. ``norm`` an ``nn.LayerNorm``, the output in
    ``out_dtype`` (default x's) with ``out_channels`` columns (default x's; see ``kernels.layer_norm``)."""
    if residual is None:
        return x, layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype, out_channels)
    branch, mask = residual
    return residual_layer_norm(x, branch, _per_image(mask), norm.weight, norm.bias, norm.eps, out_dtype, out_channels)


def draw_keep_masks(keep_rates, batch):
    """Stochastic depth's masks for blocks of keep rates ``keep_rates`` ``(n,)`` (fp32), both branches of each,
    per image, in one draw: ``(n, 2, batch, 1, 1, 1)`` fp32, each 0 or 1 / its block's keep rate (the scale exact
    whatever the maps' dtype). Two launches for all the blocks of a backbone, where a draw per block took two
    each (GroupMamba-T: 36 a training step, and more compiled, where each draw decomposes into several kernels)."""
    rates = keep_rates.view(-1, 1, 1, 1, 1, 1)
    return torch.bernoulli(rates.expand(-1, 2, batch, 1, 1, 1)).div_(rates)


class GroupMambaBlock(nn.Module):
    """``x + DropPath(GroupMambaLayer(x))``, then ``x + DropPath(ConvFFN(norm2(x)))``; channels-last.

    Each residual add is done inside the pass of the norm that reads its sum next (:func:`add_layer_norm`): the
    layer's add in ``norm2``'s, the FFN's in the next block's input norm or the stage's norm (a stage runs its
    blocks with ``pending=True``). Apart, each add was a launch forward and two backward (the branch's scaled
    gradient, and the sum of the gradients of the sum's two readers), and a pass over the map."""

    def __init__(self, dims, mlp_ratio, drop_path=0.0, with_cp=False, stored_dims=None, stored_parameters=None):
        super().__init__()
        self.attn = GroupMambaLayer(dims, stored_dims=stored_dims)
        self.norm2 = nn.LayerNorm(dims, eps=STAGE_NORM_EPS)
        self.mlp = ConvFFN(dims, int(dims * mlp_ratio), stored_dims)
        # A padded block (kernels/layout.py) lays its parameters out in the stored channels by one gather each
        # way, a training step's for all of the stage's blocks together (build_forward_weights). The gather's index
        # depends on the shapes only: a stage's blocks share one (`stored_parameters`).
        if stored_parameters is None and self.attn.stored_dims != dims:
            (attn_matmul, attn_channel), (mlp_matmul, mlp_channel) = (self.attn.stored_layouts(),
                                                                      self.mlp.stored_layouts())
            stored_parameters = StoredParameters(attn_matmul + mlp_matmul, attn_channel + mlp_channel)
        self.stored_parameters = stored_parameters
        self.drop_path = drop_path
        self.with_cp = with_cp
        self._constant_weights = None  # (key, weights) of _forward_weights, where no gradient reaches them

    def train(self, mode=True):
        # Switching modes drops the kept weights: a write through `param.data` is the one change their key cannot
        # see, and evaluation loops switch modes after such writes (mmengine's EMA hook swaps weights that way,
        # then the loop calls eval()).
        self._constant_weights = None
        return super().train(mode)

    def weight_params(self):
        """The parameters :func:`build_forward_weights` reads: the layer's and the FFN's matmul and channel ones."""
        return (self.attn.matmul_params() + self.mlp.matmul_params() + self.attn.channel_params()
                + self.mlp.channel_params())

    def _forward_weights(self, dtype):
        """The layer's and the FFN's ``forward_weights`` (:meth:`GroupMambaLayer.forward_weights`), matmul weights
        in ``dtype``, where the backbone did not build them for its whole stage (:func:`stage_forward_weights`).

        Built at every call where a gradient reaches them (a block trained on its own): the cast, block-diagonal
        projections and, in a padded block, the gather into the stored channels (``kernels/layout.py``) are then
        part of the step.
        Where none does (inference, frozen stages) they are constants of the parameters, kept between calls: in
        eager inference a block's forward then skips seven launches (the cast's concatenation and cast, the
        projections' concatenation, matmul, zero fill and two diagonal copies), a padded block also its gather.
        Kept in plain eager runs only (``kernels.ops_util.traced``): torch.compile and export trace them into
        their graphs, and a CUDA graph being recorded would read tensors that a later refresh replaces. The key
        (each parameter's storage and version counter, and the dtype) replaces them when a parameter is updated in
        place, moved or converted."""
        params = self.weight_params()
        keep = (not traced(params)
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                and not (params[0].is_cuda and torch.cuda.is_current_stream_capturing()))
        if keep:
            # Tensors made in inference mode cannot be saved for a backward outside it: kept apart.
            key = (dtype, torch.is_inference_mode_enabled(), tuple((p.data_ptr(), p._version) for p in params))
            if self._constant_weights is not None and self._constant_weights[0] == key:
                return self._constant_weights[1]
        weights, = build_forward_weights([self], dtype)
        if keep:
            self._constant_weights = (key, weights)
        return weights

    def _keep_masks(self, x):
        """This block's stochastic-depth masks drawn on their own (:func:`draw_keep_masks`): ``(2, B, 1, 1, 1)``,
        or ``(None, None)`` when nothing drops. Inside a backbone, the backbone draws every block's at once."""
        if not (self.training and self.drop_path > 0):
            return None, None
        return draw_keep_masks(torch.full((1, ), 1 - self.drop_path, device=x.device), x.shape[0])[0]

    def _forward(self, x, residual, keep_masks, weights=None):
        attn_weights, mlp_weights = weights or self._forward_weights(_compute_dtype(x))
        attn_mask, mlp_mask = self._keep_masks(x) if keep_masks is None else keep_masks
        x, normed = add_layer_norm(x, residual, self.attn.norm, _compute_dtype(x))
        x, branch = self.mlp(x, self.norm2, mlp_weights, (self.attn(normed, attn_weights, normalized=True), attn_mask))
        return x, (branch, mlp_mask)

    def forward(self, x, keep_masks=None, weights=None, residual=None, pending=False):
        """``keep_masks``: this block's ``(2, B, 1, 1, 1)`` rows of :func:`draw_keep_masks` (a backbone draws all
        its blocks' at once); None draws them here when the block drops branches. ``weights``: this block's of
        :func:`stage_forward_weights`, or None to build its own.

        ``residual``: a previous block's FFN branch still to be added to x, ``(branch, mask)`` as returned with
        ``pending=True``, or None. ``pending``: return ``(x, (branch, mask))``, the output with this block's own FFN
        branch still to be added (by the norm that reads the sum next: :func:`add_layer_norm`), instead of the
        sum."""
        if self.with_cp and x.requires_grad:
            x, own = cp.checkpoint(self._forward, x, residual, keep_masks, weights, use_reentrant=False)
        else:
            x, own = self._forward(x, residual, keep_masks, weights)
        return (x, own) if pending else add_residual(x, own)


def stage_forward_weights(blocks, dtype):
    """Every block's weights for a step that trains them (:func:`build_forward_weights`, for all of a stage's blocks
    at once), or None for each block where no gradient reaches them: each block then keeps its own between calls
    (:meth:`GroupMambaBlock._forward_weights`)."""
    if not (torch.is_grad_enabled() and any(p.requires_grad for b in blocks for p in b.weight_params())):
        return [None] * len(blocks)
    return build_forward_weights(blocks, dtype)


def build_forward_weights(blocks, dtype):
    """``(attn_weights, mlp_weights)`` of each of ``blocks`` (blocks of one stage: the same shapes), what
    :meth:`GroupMambaLayer.forward` and :meth:`ConvFFN.forward` read: the matmul weights cast to ``dtype`` in one
    cast for all the blocks (a padded stage: laid out in the stored channels and cast by one gather for all the
    blocks; traced by torch.compile, either one a block), and the groups' block-diagonal projections of all the
    blocks built together (:class:`_BlockDiagonalProjections`).
    Built per block, a training step launched about 7 kernels forward and 6 backward a block for this; per stage,
    GroupMamba-T's eager step launches 127 fewer (``benchmarks/launch_count.py --arch tiny``: 1652 -> 1525 under
    autocast), its compiled det step 44 fewer (``benchmarks/compiled_kernels.py``: 1377 -> 1333)."""
    first = blocks[0]
    attn = [b.attn.matmul_params() for b in blocks]
    mlp = [b.mlp.matmul_params() for b in blocks]
    channel = [b.attn.channel_params() + b.mlp.channel_params() for b in blocks]
    n, k, c = len(blocks), len(attn[0]), len(first.attn.channel_params())
    # Traced by torch.compile, a block at a time: Inductor lowers a concatenation to one pointwise kernel whose
    # every element tests each piece in turn (the compiled backbone's force_pointwise_cat). A whole stage of
    # GroupMamba-B (21 blocks) made such kernels of 336 pieces forward and 378 backward (the gradients, with the
    # projections' diagonal blocks), the backward one 95 ms of a 159 ms det step on an H100. A block's pieces make
    # kernels that Inductor's combo kernels launch together, the launches of the step as many as before.
    calls = [[i] for i in range(n)] if traced(attn[0]) else [list(range(n))]
    if first.stored_parameters is None:
        cast = []
        for call in calls:
            flat = cast_together([p for i in call for p in attn[i] + mlp[i]], dtype)
            step = len(flat) // len(call)
            cast += [flat[j * step:(j + 1) * step] for j in range(len(call))]
    else:
        # A padded stage: its blocks' parameters laid out in the stored channels, and cast, by one gather.
        cast, channel = zip(*(stored for call in calls
                              for stored in first.stored_parameters([(attn[i] + mlp[i], channel[i]) for i in call],
                                                                    dtype)))
    # The groups' scan weights, (n, G, ...) each; one block's as views (a stack of one would copy).
    stacked = [cast[0][j].unsqueeze(0) if n == 1 else torch.stack([params[j] for params in cast]) for j in range(4)]
    projections = zip(*(w.unbind(0) for w in _BlockDiagonalProjections.apply(*stacked)))
    return [(b.attn.forward_weights(ca[:k], ch[:c], proj), b.mlp.forward_weights(ca[k:], ch[c:]))
            for b, ca, ch, proj in zip(blocks, cast, channel, projections)]


class PlainFFN(nn.Module):
    """``fc2(gelu(fc1(x)))``: the class block's FFN (no depthwise conv: there is a single token)."""

    def __init__(self, dims, hidden_dims):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ClassBlock(nn.Module):
    """The official ``post_network`` block, on a ``(B, 1, 1, C)`` class token.

    ``x = x + norm1(attn(x)); x = x + mlp(norm2(x))``. On a 1x1 map the layer's scans have length 1 and its
    channel affinity sees the token itself, as in the official model.
    """

    def __init__(self, dims, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=STAGE_NORM_EPS)
        self.norm2 = nn.LayerNorm(dims, eps=STAGE_NORM_EPS)
        self.attn = GroupMambaLayer(dims)
        self.mlp = PlainFFN(dims, int(dims * mlp_ratio))

    def forward(self, token):
        token = token + self.norm1(self.attn(token))
        return token + self.mlp(self.norm2(token))


class ConvStem(nn.Module):
    """Three convs (7x7 s2, 3x3, 3x3) with BN and ReLU, then a 3x3 s2 projection and LayerNorm: /4. The convs
    here and in :class:`Downsample` are :class:`OpaqueConv2d`, so that a compiled backbone keeps its sizes
    symbolic on torch 2.14."""

    def __init__(self, in_channels, hidden_dims, out_dims, norm_cfg, stored_dims=None):
        super().__init__()
        self.stored_dims = stored_dims or out_dims  # the stage's (kernels/layout.py): the norm writes them
        layers = []
        for i, kernel in enumerate((7, 3, 3)):
            layers += [
                OpaqueConv2d(in_channels if i == 0 else hidden_dims, hidden_dims, kernel, stride=2 if i == 0 else 1,
                             padding=kernel // 2, bias=False),
                build_norm_layer(norm_cfg, hidden_dims)[1],
                nn.ReLU(inplace=True),
            ]
        self.conv = nn.Sequential(*layers)
        self.proj = OpaqueConv2d(hidden_dims, out_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dims)

    def forward(self, x):
        """x: NCHW image (channels-last in memory, as :meth:`GroupMamba.forward` passes it: cuDNN then runs the
        BatchNorms and convs without NCHW<->NHWC conversions, and the projection's output is already the
        channels-last map the stages work on) -> ``(B, H/4, W/4, C)``."""
        return apply_layer_norm(self.norm, _to_nhwc(self.proj(self.conv(x))), self.stored_dims)


class Downsample(nn.Module):
    """3x3 stride-2 conv and LayerNorm between stages, channels-last in and out."""

    def __init__(self, in_dims, out_dims, stored_dims=None):
        super().__init__()
        self.proj = OpaqueConv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dims)
        self.stored_dims = stored_dims or out_dims  # as ConvStem's

    def forward(self, x):
        return apply_layer_norm(self.norm, _to_nhwc(self.proj(_to_nchw(x))), self.stored_dims)


@MODELS.register_module()
class GroupMamba(BaseModule):
    """GroupMamba backbone for detection, segmentation (``out_type='featmap'``) and classification
    (``out_type='cls_token'``, the official classifier's, or ``'avg_featmap'``).

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` or a dict with keys ``stem_hidden_dim``,
            ``embed_dims``, ``mlp_ratios`` and ``depths``.
        in_channels (int): image channels.
        out_indices (Sequence[int], optional): stages (0-3) whose outputs are returned. Defaults to all four
            for ``out_type='featmap'`` and to the last, ``(3,)``, for the pooled types (as mmpretrain's
            VisionTransformer: its last layer by default). ``'cls_token'`` takes only ``(3,)``.
        out_type (str): what is returned for each of ``out_indices``, after mmpretrain's VisionTransformer:

            - ``'featmap'``: the stage's normalised map, NCHW ``(B, C_i, H_i, W_i)`` (detection, segmentation).
            - ``'avg_featmap'``: the spatial mean of that map, ``(B, C_i)``.
            - ``'cls_token'``: the official classifier's class token ``(B, C_4)``: the last stage's tokens
              (before ``norm4``) mean-pooled, refined by ``post_network`` (one :class:`ClassBlock`, built
              only for this type; official keys ``post_network.0.*``) and normalised by ``norm4``.
        drop_path_rate (float): stochastic depth, rising linearly over all blocks.
        frozen_stages (int): -1 trains everything; 0 freezes the stem (``patch_embed1``); k >= 1 freezes
            stages 1..k (their ``patch_embed``, blocks and ``norm``).
        norm_eval (bool): keep the stem's BatchNorm layers in eval mode while training.
        with_cp (bool): gradient checkpointing of every block (saves memory, costs a recompute).
        norm_cfg (dict): norm of the conv stem (``BN``; ``SyncBN`` for multi-GPU training).
        cuda_graph (bool | str): replay forward and backward from CUDA graphs recorded per input size
            (:mod:`mmgroupmamba.models.cuda_graph`). A step then costs the host one launch instead of
            thousands; worth it where inputs come in a few fixed sizes (classification, segmentation crops,
            fixed-size detection). Other inputs run eagerly, with a log line. ``'train'``: only while the
            module is in training mode, for fixed-size training whose evaluation images come in many sizes
            (each would record its own graphs); evaluation then runs eagerly.
        channel_multiple (int): a stage whose width is not a multiple of this (stage 3 of T and S: 348, of B:
            424) stores its maps padded, each scan group followed by zero channels (``kernels/layout.py``: 348 as
            352, 424 as 432), so that its matmuls run cuBLAS's fast kernels (on an H200, 2.7x faster for that
            stage's; README) and the Triton kernels read and write 16-byte vectors. Results and parameters are
            those of the unpadded model; 1 turns it off.
        compile (bool | dict): run the backbone through ``torch.compile`` (one graph, no graph break, sizes
            symbolic so that new input sizes reuse it): ``True`` for the defaults (``dynamic=True,
            fullgraph=True``, Inductor options ``COMPILE_INDUCTOR_DEFAULTS``) or a dict of ``torch.compile``
            arguments (``mode``, ``dynamic``, ``fullgraph``, ``backend``, ``options``; a ``mode`` such as
            ``'reduce-overhead'``, CUDA graphs recorded per input size, joins the Inductor options). Compiles the
            backbone only, so it works inside any training loop (mmengine's own ``compile=True`` compiles the
            whole train step). Exclusive with ``cuda_graph``.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` for an official
            GroupMamba ImageNet checkpoint (raw, under ``model``/``state_dict``, with or without ``backbone.``).
    """

    def __init__(self,
                 arch='tiny',
                 in_channels=3,
                 out_indices=None,
                 out_type='featmap',
                 drop_path_rate=0.0,
                 frozen_stages=-1,
                 norm_eval=False,
                 with_cp=False,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 cuda_graph=False,
                 compile=False,
                 channel_multiple=CHANNEL_MULTIPLE,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if not (isinstance(cuda_graph, bool) or cuda_graph == 'train'):
            raise ValueError(f'GroupMamba: cuda_graph={cuda_graph!r}; choose one of {CUDA_GRAPH_MODES} (graphs in '
                             "training and evaluation, in training only ('train'), or none)")
        if cuda_graph and with_cp:
            # Checkpointing's recomputation saves and restores the RNG state, which a recorded graph cannot.
            raise ValueError(f'GroupMamba: cuda_graph={cuda_graph!r} and with_cp=True cannot be combined')
        if cuda_graph and compile:
            raise ValueError('GroupMamba: cuda_graph and compile cannot be combined; choose one')
        self.arch = resolve_arch(arch)
        self.arch_name = arch_name(self.arch)  # names the official weights in errors
        embed_dims, depths = self.arch['embed_dims'], self.arch['depths']
        self.num_stages = len(depths)
        if out_type not in OUT_TYPES:
            raise ValueError(f'GroupMamba: unknown out_type {out_type!r}; choose one of {OUT_TYPES} (NCHW maps, '
                             f'their spatial means, the official class token)')
        last = self.num_stages - 1
        if out_indices is None:
            out_indices = range(self.num_stages) if out_type == 'featmap' else (last, )
        out_indices = tuple(out_indices)
        if out_type == 'cls_token' and out_indices != (last, ):
            raise ValueError(f"GroupMamba: out_type='cls_token' has one output, after the last stage: out_indices "
                             f"must be ({last},) or left out, got {out_indices}; for pooled maps of other stages use "
                             f"out_type='avg_featmap'")
        for i in out_indices:
            if not 0 <= i < self.num_stages:
                raise ValueError(f'GroupMamba: out_indices must lie in [0, {self.num_stages - 1}], got {out_indices}')
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'GroupMamba: frozen_stages must lie in [-1, {self.num_stages}], got {frozen_stages}')
        self.out_indices = out_indices
        self.out_type = out_type
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.embed_dims = embed_dims
        if not (isinstance(channel_multiple, int) and channel_multiple >= 1):
            raise ValueError(f'GroupMamba: channel_multiple must be an int >= 1, got {channel_multiple!r}')
        self.stored_dims = [stored_channels(dims, channel_multiple) for dims in embed_dims]

        block_drop = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(self.num_stages):
            if i == 0:
                patch_embed = ConvStem(in_channels, self.arch['stem_hidden_dim'], embed_dims[0], norm_cfg,
                                       self.stored_dims[0])
            else:
                patch_embed = Downsample(embed_dims[i - 1], embed_dims[i], self.stored_dims[i])
            first = sum(depths[:i])
            blocks = nn.ModuleList()
            for j in range(depths[i]):
                blocks.append(GroupMambaBlock(embed_dims[i], self.arch['mlp_ratios'][i], block_drop[first + j],
                                              with_cp, self.stored_dims[i],
                                              blocks[0].stored_parameters if blocks else None))
            self.add_module(f'patch_embed{i + 1}', patch_embed)
            self.add_module(f'block{i + 1}', blocks)
            self.add_module(f'norm{i + 1}', nn.LayerNorm(embed_dims[i], eps=STAGE_NORM_EPS))
        if out_type == 'cls_token':
            self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], self.arch['mlp_ratios'][-1])])
        # The keep rates of the blocks that can drop branches, in block order: one draw of all their masks a step
        # (draw_keep_masks). Not persistent: the drop rates are constructor arguments, not checkpoint state.
        dropping = [k for k, rate in enumerate(block_drop) if rate > 0]
        self.register_buffer('keep_rates', torch.tensor([1 - block_drop[k] for k in dropping], dtype=torch.float32),
                             persistent=False)
        rows = {k: row for row, k in enumerate(dropping)}
        self._mask_rows = [[rows.get(sum(depths[:i]) + j) for j in range(depth)] for i, depth in enumerate(depths)]
        self.apply(init_official_weights)
        self._freeze_stages()
        self._cuda_graphs = CudaGraphs('GroupMamba') if cuda_graph else None
        self._graphs_in_eval = cuda_graph is True
        self._compiled = CompiledForward('GroupMamba', compile, COMPILE_INDUCTOR_DEFAULTS) if compile else None

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

    def forward_stage(self, i, x, keep_masks=None):
        """Stage ``i`` (0-based) without its norm: downsampling (or the stem) and blocks, channels-last, in the
        stage's stored channels (``stored_dims[i]``). Returns ``(x, residual)``: the last block's output with its FFN
        branch still to be added (``GroupMambaBlock``'s ``pending``), by the stage's norm. ``keep_masks``:
        :meth:`keep_masks`' (a block in training mode reads its row), or None for each block to draw its own."""
        x = getattr(self, f'patch_embed{i + 1}')(x)
        blocks = getattr(self, f'block{i + 1}')
        weights = stage_forward_weights(blocks, _compute_dtype(x))
        residual = None
        for block, row, block_weights in zip(blocks, self._mask_rows[i], weights):
            # A frozen stage's blocks stay in eval mode (_freeze_stages) and drop nothing.
            masks = keep_masks[row] if keep_masks is not None and row is not None and block.training else None
            x, residual = block(x, masks, block_weights, residual, pending=True)
        return x, residual

    def keep_masks(self, x):
        """Every dropping block's stochastic-depth masks for the batch ``x``, in block order, from one draw
        (:func:`draw_keep_masks`), or None when no block drops (evaluation, ``drop_path_rate=0``)."""
        if not (self.training and len(self.keep_rates)):
            return None
        return draw_keep_masks(self.keep_rates, x.shape[0])

    def _apply(self, fn, *args, **kwargs):
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()  # recorded graphs point at the old tensors
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        check_image_batch(x, self.patch_embed1.conv[0].weight, in_channels=self.patch_embed1.conv[0].in_channels)
        # The image in the memory layout and dtype the stem's first conv reads, in one copy, before any graph: in
        # a compiled graph Inductor joined this transposition with the stem weights' casts into one combo kernel,
        # whose shared tiling launched millions of empty programs (1.3 ms of a 27 ms det step on an H200).
        x = x.to(_compute_dtype(x), memory_format=torch.channels_last)
        if self._cuda_graphs is not None and (self.training or self._graphs_in_eval):
            return self._cuda_graphs(self, self._forward, x)
        if self._compiled is not None:
            return self._compiled(self._forward, x)
        return self._forward(x)

    def _forward(self, x):
        # out_type and out_indices are constructor constants: the branches below are fixed for a model, and
        # torch.compile traces one path.
        outs = []
        keep_masks = self.keep_masks(x)
        for i in range(self.num_stages):
            x, residual = self.forward_stage(i, x, keep_masks)
            if self.out_type == 'cls_token' and i == self.num_stages - 1:
                return (self._class_token(unpad_groups(add_residual(x, residual), self.embed_dims[i])), )
            # The official model feeds the normalised map of stages 1-3 into the next stage; the norm writes it
            # unpadded, in PyTorch's dtype (apply_layer_norm), after the last block's pending residual add.
            x = add_layer_norm(x, residual, getattr(self, f'norm{i + 1}'), _norm_dtype(x), self.embed_dims[i])[1]
            if i in self.out_indices:
                outs.append(x.mean((1, 2)) if self.out_type == 'avg_featmap' else _to_nchw(x).contiguous())
        return tuple(outs)

    def _class_token(self, tokens):
        """The official classifier's vector from the last stage's un-normalised tokens ``(B, H, W, C)``."""
        token = tokens.mean((1, 2), keepdim=True)  # (B, 1, 1, C)
        for block in self.post_network:
            token = block(token)
        return apply_layer_norm(getattr(self, f'norm{self.num_stages}'), token.flatten(1))


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
    elif isinstance(module, GroupMambaLayer):
        module.reset_scan_parameters()

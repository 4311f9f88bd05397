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
run group by group: the layer assembles them into block-diagonal weights and runs every group in one linear
layer, one depthwise conv and one scan launch. All tensors inside a stage are channels-last ``(B, H, W, C)``.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from mmgroupmamba.checkpoint import load_backbone_checkpoint
from mmgroupmamba.kernels import SCAN_DIRECTIONS, gated_group_norm, layer_norm, selective_scan

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


def _block_diagonal(blocks, eye):
    """``(G, m, n)`` blocks -> the ``(G*m, G*n)`` block-diagonal matrix, in one multiply (``eye``: ``G x G``).

    ``torch.block_diag`` copies (and in backward slices) block by block: many small launches per call.
    """
    groups, rows, cols = blocks.shape
    return (blocks[:, :, None, :] * eye[:, None, :, None]).reshape(groups * rows, groups * cols)


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


class GroupMambaLayer(nn.Module):
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

    @property
    def scan_groups(self):
        return [getattr(self, f'mamba_g{g + 1}') for g in range(NUM_GROUPS)]

    def _grouped_weights(self):
        """All groups' parameters as one set of block-diagonal / concatenated tensors (differentiable).

        Built from stacked parameters in a few large ops: this runs in every forward, and each op here (and its
        backward) is a kernel launch on the GPU.
        """
        groups = self.scan_groups
        d, r = groups[0].Ds.numel(), groups[0].dt_rank
        in_proj = torch.stack([g.in_proj.weight for g in groups])  # (G, 2d, d): rows (u, z)
        x_proj = torch.cat([g.x_proj_weight for g in groups])  # (G, r + 2, d): rows (dt, B, C)
        dt_proj = torch.cat([g.dt_projs_weight for g in groups])  # (G, d, r)
        eye = torch.eye(NUM_GROUPS, dtype=in_proj.dtype, device=in_proj.device)
        # B and C rows as (2, G, d), block-diagonal over groups -> rows (B_0..B_3, C_0..C_3).
        bc = (x_proj[:, r:].transpose(0, 1)[:, :, None, :] * eye[None, :, :, None]).reshape(2 * NUM_GROUPS, -1)
        return dict(
            in_u=_block_diagonal(in_proj[:, :d], eye),
            in_z=_block_diagonal(in_proj[:, d:], eye),
            conv_weight=torch.cat([g.conv2d.weight for g in groups]),
            conv_bias=torch.cat([g.conv2d.bias for g in groups]),
            # delta = dt_proj(x_proj_dt(u)): the two maps fold into one (d, d) matrix per group.
            delta=_block_diagonal(torch.bmm(dt_proj, x_proj[:, :r]), eye),
            bc=bc,
            delta_bias=torch.cat([g.dt_projs_bias for g in groups], dim=1).view(-1),
            A=torch.cat([g.A_logs for g in groups]).view(-1).float().exp().neg(),
            D=torch.cat([g.Ds for g in groups]),
            out_norm_weight=torch.cat([g.out_norm.weight for g in groups]),
            out_norm_bias=torch.cat([g.out_norm.bias for g in groups]),
            out_proj=_block_diagonal(torch.stack([g.out_proj.weight for g in groups]), eye),
        )

    def forward(self, x):
        """x: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        batch, height, width, dims = x.shape
        w = self._grouped_weights()
        x = self._norm(x)
        affinity = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((1, 2))))))

        # Separate projections keep u and z contiguous: the conv then reads u in place (channels-last) and the
        # fused norm reads z without a copy.
        u = F.linear(x, w['in_u'])
        z = F.linear(x, w['in_z'])
        u = _to_nhwc(F.conv2d(_to_nchw(u), w['conv_weight'], w['conv_bias'], padding=1, groups=dims))
        u = F.silu(u).reshape(batch, height * width, dims)
        b, c = F.linear(u, w['bc']).split(NUM_GROUPS, dim=-1)
        y = selective_scan(u, F.linear(u, w['delta']), w['A'], b, c, w['D'], w['delta_bias'], (height, width))

        # Each group's out_norm normalises over that group's channels only; fused with the SiLU(z) gate.
        y = gated_group_norm(y.view(batch, height, width, dims), z, w['out_norm_weight'], w['out_norm_bias'],
                             NUM_GROUPS, self.scan_groups[0].out_norm.eps)
        y = F.linear(y, w['out_proj'])
        # skip_scale and the channel affinity are per (image, channel): fold them before touching the map.
        y = y * x * (self.skip_scale * affinity)[:, None, None, :]
        return self.proj(self._norm(y))

    def _norm(self, x):
        return layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)


def _depthwise_conv(x, weight, bias):
    """3x3 depthwise conv of a channels-last map."""
    return _to_nhwc(F.conv2d(_to_nchw(x), weight, bias, padding=1, groups=x.shape[-1]))


class DepthwiseConv(nn.Module):
    """Holds the FFN's 3x3 depthwise conv under the official key (``mlp.dwconv.dwconv``); run by ConvFFN."""

    def __init__(self, dims):
        super().__init__()
        self.dwconv = nn.Conv2d(dims, dims, 3, padding=1, groups=dims)


class ConvGeluLinearFn(torch.autograd.Function):
    """``linear(gelu(dwconv(h)))`` that keeps only ``h`` for backward.

    The FFN's hidden maps (8x the channels in stages 1-2) are the largest activations of the model, and plain
    autograd keeps three of them (the conv's, the GELU's and the linear layer's inputs). This keeps one and
    recomputes the depthwise conv and the GELU (memory-bound, cheap) in backward; the linear layer's matmul is
    not recomputed. Autocast is re-entered for the recomputation as it was in forward.
    """

    @staticmethod
    def forward(ctx, h, conv_weight, conv_bias, weight, bias):
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(h, conv_weight, conv_bias, weight)
        ctx.param_dtypes = (conv_weight.dtype, conv_bias.dtype, weight.dtype, bias.dtype)
        return F.linear(F.gelu(_depthwise_conv(h, conv_weight, conv_bias)), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, conv_weight, conv_bias, weight = ctx.saved_tensors
        device, autocast, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            inputs = [t.detach().requires_grad_() for t in (h, conv_weight, conv_bias)]
            hidden = F.gelu(_depthwise_conv(*inputs))
            grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])
            hidden2 = hidden.detach().reshape(-1, hidden.shape[-1])
            grad_hidden = (grad_out2 @ weight).view_as(hidden)
            grad_weight = grad_out2.t() @ hidden2
        grad_bias = grad_out2.sum(0, dtype=torch.float32)
        grad_h, grad_conv_weight, grad_conv_bias = torch.autograd.grad(hidden, inputs, grad_hidden.to(hidden.dtype))
        grads = (grad_conv_weight, grad_conv_bias, grad_weight, grad_bias)
        return (grad_h, *(g.to(dtype) for g, dtype in zip(grads, ctx.param_dtypes)))


class ConvFFN(nn.Module):
    """FFN with a depthwise conv between its two linear layers (PVTv2 style)."""

    def __init__(self, dims, hidden_dims):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.dwconv = DepthwiseConv(hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)

    def forward(self, x):
        h = self.fc1(x)
        conv = self.dwconv.dwconv
        if torch.is_grad_enabled() and h.requires_grad:
            return ConvGeluLinearFn.apply(h, conv.weight, conv.bias, self.fc2.weight, self.fc2.bias)
        # Nothing is kept for backward without grad: the plain ops are the same computation.
        return self.fc2(F.gelu(_depthwise_conv(h, conv.weight, conv.bias)))


class GroupMambaBlock(nn.Module):
    """``x + DropPath(GroupMambaLayer(x))``, then ``x + DropPath(ConvFFN(norm2(x)))``; channels-last."""

    def __init__(self, dims, mlp_ratio, drop_path=0.0, with_cp=False):
        super().__init__()
        self.attn = GroupMambaLayer(dims)
        self.norm2 = nn.LayerNorm(dims, eps=STAGE_NORM_EPS)
        self.mlp = ConvFFN(dims, int(dims * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.with_cp = with_cp

    def _forward(self, x):
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(layer_norm(x, self.norm2.weight, self.norm2.bias, self.norm2.eps)))

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
        return self.norm(_to_nhwc(self.proj(self.conv(x))))


class Downsample(nn.Module):
    """3x3 stride-2 conv and LayerNorm between stages, channels-last in and out."""

    def __init__(self, in_dims, out_dims):
        super().__init__()
        self.proj = nn.Conv2d(in_dims, out_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dims)

    def forward(self, x):
        return self.norm(_to_nhwc(self.proj(_to_nchw(x))))


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
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
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

    def forward(self, x):
        outs = []
        for i in range(self.num_stages):
            normed = getattr(self, f'norm{i + 1}')(self.forward_stage(i, x))
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

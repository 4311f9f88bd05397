"""GroupMamba ending in the official class-token block: the backbone of the ImageNet classifier.

The official classifier does not pool the normalised stage-4 map. It mean-pools the last block's tokens (before
``norm4``) into a class token, refines that single token with ``post_network`` (one :class:`ClassBlock`) and
normalises it with ``norm4``; the heads read that vector. Parameter names are the official ones
(``post_network.0.attn.mamba_g1.A_logs`` ...), under ``backbone.`` in the mmpretrain model.
"""
import torch.nn as nn
import torch.nn.functional as F
from mmpretrain.registry import MODELS

from mmgroupmamba.models.groupmamba import (STAGE_NORM_EPS, GroupMamba, GroupMambaLayer, apply_layer_norm,
                                             init_official_weights)


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


@MODELS.register_module()
class GroupMambaClsBackbone(GroupMamba):
    """GroupMamba for image classification: returns the official class token as ``((B, C_4),)``.

    Takes the arguments of :class:`mmgroupmamba.models.GroupMamba` except ``out_indices`` (all four stages run
    and only the class token comes out; use ``GroupMamba`` for feature maps).
    """

    def __init__(self, arch='tiny', **kwargs):
        if 'out_indices' in kwargs:
            raise TypeError('GroupMambaClsBackbone: out_indices is not an argument (the output is the class token); '
                            'use type="GroupMamba" for feature maps')
        super().__init__(arch=arch, out_indices=(3, ), **kwargs)
        self.post_network = nn.ModuleList([ClassBlock(self.embed_dims[-1], self.arch['mlp_ratios'][-1])])
        self.post_network.apply(init_official_weights)

    def _forward(self, x):  # GroupMamba.forward runs it, from CUDA graphs with cuda_graph=True
        last = self.num_stages - 1
        for i in range(self.num_stages):
            x = self.forward_stage(i, x)
            if i < last:
                x = apply_layer_norm(getattr(self, f'norm{i + 1}'), x)
        token = x.mean((1, 2), keepdim=True)  # (B, 1, 1, C): the raw last-stage tokens, pooled
        for block in self.post_network:
            token = block(token)
        return (apply_layer_norm(getattr(self, f'norm{last + 1}'), token.flatten(1)), )

"""Padded channel layout: how a stage whose width is not a multiple of 8 carries its maps.

cuBLAS runs its Hopper fp16/bf16 GEMM kernels only when K and N are multiples of 8; GroupMamba-T's and -S's
stage 3 has 348 channels, and its matmuls fell back to sm80 kernels 2.7x slower (H200,
``benchmarks/gemm_alignment.py``). Such a stage stores its maps with each of the 4 scan groups' ``V`` channels
followed by ``P - V`` zero channels (87 -> 88: 348 stored as 352), so that its matmuls see K and N of ``4 P``.
The layout is per scan group, not trailing, because the scan assigns channels to directions by group.

Parameters keep their official shapes (``V`` per group): the model pads the matmul weights it assembles per
step (zero rows and columns at the pad channels) and the per-channel parameters the convs and the scan read;
the norms read their compact affines through the layout and normalise over the valid channels only
(``triton_gated_norm.py``), writing zeros into the pad channels. Every map of a padded stage therefore holds
exact zeros there, and no pad channel adds anything to a valid one.
"""
import torch.nn.functional as F

from .directions import SCAN_DIRECTIONS

GROUPS = len(SCAN_DIRECTIONS)
# cuBLAS's Hopper kernels need K and N to be multiples of 8 elements (16 bytes of fp16/bf16).
CHANNEL_MULTIPLE = 8


def stored_channels(channels, multiple=CHANNEL_MULTIPLE):
    """The channels a stage of ``channels`` stores: itself where it is a multiple of ``multiple`` (or
    ``multiple`` is 1), else each scan group's width rounded up so that the groups' total is."""
    if multiple <= 1 or channels % multiple == 0:
        return channels
    if channels % GROUPS:
        raise ValueError(f'channels={channels} must split into {GROUPS} scan groups')
    group = channels // GROUPS
    while (GROUPS * group) % multiple:
        group += 1
    return GROUPS * group


def group_widths(valid, stored):
    """``(V, P)``: valid and stored channels per scan group of a map storing ``valid`` channels as ``stored``."""
    if valid % GROUPS or stored % GROUPS or stored < valid:
        raise ValueError(f'a padded map stores {GROUPS} groups: {valid} channels cannot be stored as {stored}')
    return valid // GROUPS, stored // GROUPS


def pad_groups(t, stored, dim=-1):
    """``t`` with its ``dim`` (the valid channels) stored as ``stored``: each group followed by zeros."""
    if t.shape[dim] == stored:
        return t
    dim = dim - t.dim() if dim >= 0 else dim  # negative: the same index after unflatten
    v, p = group_widths(t.shape[dim], stored)
    return F.pad(t.unflatten(dim, (GROUPS, v)), (0, 0) * (-dim - 1) + (0, p - v)).flatten(dim - 1, dim)


def unpad_groups(t, valid, dim=-1):
    """The inverse of :func:`pad_groups`: the ``valid`` channels of ``t``'s padded ``dim``, compact."""
    if t.shape[dim] == valid:
        return t
    dim = dim - t.dim() if dim >= 0 else dim
    v, p = group_widths(valid, t.shape[dim])
    return t.unflatten(dim, (GROUPS, p)).narrow(dim, 0, v).flatten(dim - 1, dim)


def pad_square(t, stored):
    """A ``(C, C)`` matrix with its rows and columns stored as ``stored``, in one pad."""
    if t.shape[-1] == stored:
        return t
    v, p = group_widths(t.shape[-1], stored)
    return F.pad(t.view(GROUPS, v, GROUPS, v), (0, p - v, 0, 0, 0, p - v)).view(stored, stored)


def pad_blocks(blocks, rows, cols):
    """``(..., m, n)`` per-group blocks padded with zero rows and columns to ``(..., rows, cols)``."""
    if blocks.shape[-2:] == (rows, cols):
        return blocks
    return F.pad(blocks, (0, cols - blocks.shape[-1], 0, rows - blocks.shape[-2]))

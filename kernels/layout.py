"""Padded channel layout: how a stage whose width is not a multiple of 8 carries its maps.

cuBLAS runs its Hopper fp16/bf16 GEMM kernels only when K and N are multiples of 8; GroupMamba-T's and -S's
stage 3 has 348 channels, and its matmuls fell back to sm80 kernels 2.7x slower (H200,
``benchmarks/gemm_alignment.py``). Such a stage stores its maps with each of the 4 scan groups' ``V`` channels
followed by ``P - V`` zero channels (87 -> 88: 348 stored as 352), so that its matmuls see K and N of ``4 P``.
The layout is per scan group, not trailing, because the scan assigns channels to directions by group.

Parameters keep their official shapes (``V`` per group): a padded block lays the matmul weights and the
per-channel parameters the convs and the scan read out in the stored channels at every step, all in one gather
(:class:`StoredParameters`: zero rows and columns at the pad channels); the norms read their compact affines
through the layout and normalise over the valid channels only (``triton_gated_norm.py``), writing zeros into the
pad channels. Every map of a padded stage therefore holds
exact zeros there, and no pad channel adds anything to a valid one.
"""
import math

import torch
import torch.nn.functional as F

from .directions import SCAN_DIRECTIONS

GROUPS = len(SCAN_DIRECTIONS)
# cuBLAS's Hopper kernels need K and N to be multiples of 8 elements (16 bytes of fp16/bf16). 16, not 8: the
# Triton kernels then also read and write 2-byte maps in 16-byte vectors (at 8, GroupMamba-B's stage 3, 424
# channels, compiled to 2-byte accesses, kernels/README.md "Access widths"), and rows start on 32-byte sectors.
# Stored as 432, B's graphed det step took 54.8-54.9 ms of kernels against 55.2-55.3 and trained 2.6 % faster
# (README, forty-seventh session). T's and S's widths are the same either way (348 is stored as 352).
CHANNEL_MULTIPLE = 16


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


def pad_blocks(blocks, rows, cols):
    """``(..., m, n)`` per-group blocks padded with zero rows and columns to ``(..., rows, cols)``."""
    if blocks.shape[-2:] == (rows, cols):
        return blocks
    return F.pad(blocks, (0, cols - blocks.shape[-1], 0, rows - blocks.shape[-2]))


def stored_index(layouts, align):
    """Where a set of tensors go when they are laid out in their stored channels, one after another in one
    buffer, each starting at a multiple of ``align`` elements. ``layouts``: ``(shape, pad)`` per tensor, ``pad``
    laying a tensor of that shape out with zeros (:func:`pad_groups` and the like).

    Returns ``(index, inverse, offsets, stored_shapes)``. ``index[j]`` is the element of the tensors' flat
    concatenation behind one zero element that the buffer's element ``j`` holds (0, the zero, in pad channels
    and in the gaps); ``inverse[i]`` is where compact element ``i`` (of the concatenation without the zero)
    lands; ``offsets`` and ``stored_shapes`` place and shape each stored tensor. Built by running the pads
    themselves on the elements' positions, so the layout is theirs by construction."""
    position, pieces, offsets, shapes, size = 1, [], [], [], 0
    for shape, pad in layouts:
        count = math.prod(shape)
        part = pad(torch.arange(position, position + count).view(shape))
        position += count
        offsets.append(size)
        shapes.append(tuple(part.shape))
        gap = -part.numel() % align
        pieces += [part.reshape(-1), part.new_zeros(gap)]
        size += part.numel() + gap
    index = torch.cat(pieces)
    placed = index.nonzero().squeeze(1)
    inverse = torch.empty(position - 1, dtype=torch.int64)
    inverse[index[placed] - 1] = placed
    return index.int(), inverse.int(), offsets, shapes


class _GatherStored(torch.autograd.Function):
    """The parameters of ``n`` blocks of the same shapes laid out in their stored channels by one gather, each
    block's first ``cast_count`` then cast together to ``dtype``; backward, one gather back (each compact element
    has one stored place). ``params``: the blocks' parameters one block after another, as are the outputs."""

    @staticmethod
    def forward(ctx, index, inverse, offsets, shapes, cast_count, dtype, *params):
        per_block = len(shapes)
        blocks = len(params) // per_block
        # A row per block, its element 0 the zero that index reads at pad channels and gaps: one gather of all rows.
        zero = params[0].new_zeros(1)
        compact = torch.cat([t for b in range(blocks)
                             for t in [zero] + [as_flat(p) for p in params[b * per_block:(b + 1) * per_block]]])
        stored = compact.view(blocks, -1).index_select(1, index)
        cast_end = offsets[cast_count] if cast_count < len(offsets) else stored.shape[1]
        cast = stored[:, :cast_end].to(dtype)
        ctx.set_materialize_grads(False)  # an output that gets no gradient costs nothing then
        ctx.save_for_backward(inverse)
        ctx.param_shapes = [p.shape for p in params[:per_block]]
        # Each stored tensor is followed by a gap up to the next one's aligned start.
        gaps = [end - start - math.prod(shape)
                for shape, start, end in zip(shapes, offsets, offsets[1:] + [stored.shape[1]])]
        ctx.layout = (shapes, gaps, cast_count, stored.dtype, cast.dtype)
        kept = cast_count < len(shapes)
        return tuple(t for b in range(blocks)
                     for t in split_with_gaps(cast[b], shapes[:cast_count], gaps[:cast_count])
                     + (split_with_gaps(stored[b, cast_end:], shapes[cast_count:], gaps[cast_count:]) if kept else []))

    @staticmethod
    def backward(ctx, *grads):
        inverse, = ctx.saved_tensors
        shapes, gaps, cast_count, source_dtype, cast_dtype = ctx.layout
        per_block = len(shapes)
        blocks = len(grads) // per_block
        # The stored rows' gradient, concatenated with unfilled pieces where nothing is read back (pad channels,
        # gaps, outputs without a gradient): one concatenation per dtype (and one of the two), one cast.
        filler_size = max(math.prod(s) + gap for s, gap in zip(shapes, gaps))

        def rows(first, last, dtype):
            # Parameters [first, last) of every block, as rows; the unfilled places are slices of one buffer, made
            # only where a place needs it.
            block_grads = [grads[b * per_block + first:b * per_block + last] for b in range(blocks)]
            needed = any(gaps[first:last]) or any(g is None for bg in block_grads for g in bg)
            filler = inverse.new_empty(filler_size, dtype=dtype) if needed else None
            flat = [filler[:math.prod(s)] if g is None else as_flat(g)
                    for bg in block_grads for g, s in zip(bg, shapes[first:last])]
            return torch.cat(with_gaps(flat, gaps[first:last] * blocks, filler)).view(blocks, -1)

        spans = ([(0, per_block, source_dtype)] if cast_dtype == source_dtype
                 else [(0, cast_count, cast_dtype), (cast_count, per_block, source_dtype)])
        parts = [rows(first, last, dtype).to(source_dtype) for first, last, dtype in spans if last > first]
        stored = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        compact = stored.index_select(1, inverse)
        sizes = [math.prod(s) for s in ctx.param_shapes]
        return (None, ) * 6 + tuple(None if grad is None else (part if len(s) == 1 else part.view(s))
                                    for b in range(blocks)
                                    for grad, part, s in zip(grads[b * per_block:(b + 1) * per_block],
                                                             compact[b].split(sizes), ctx.param_shapes))


# Helpers for tensors laid out one after another in one buffer, each followed by a gap (alignment padding, pad
# channels), as the parameters are at every eager step, each way. They keep the per-tensor work to what changes
# a shape, since each view, flatten or slice is a dispatcher call of the step (benchmarks/host_proxy.py counts
# them): 1-D tensors are neither flattened nor viewed, gaps of no elements get no piece, and one split cuts a
# buffer.
def as_flat(t):
    """``t.reshape(-1)``, without the call for a tensor that is 1-D already."""
    return t if t.dim() == 1 else t.reshape(-1)


def with_gaps(pieces, gaps, filler):
    """1-D ``pieces``, each followed by ``gap`` elements of the 1-D ``filler`` where ``gap`` is not zero: the list
    to concatenate."""
    return [part for piece, gap in zip(pieces, gaps) for part in ((piece, filler[:gap]) if gap else (piece,))]


def split_with_gaps(buffer, shapes, gaps):
    """The tensors of ``shapes`` laid out in the 1-D ``buffer`` as :func:`with_gaps` lays them out: views of it."""
    sizes, first = [], []
    for shape, gap in zip(shapes, gaps):
        first.append(len(sizes))
        sizes += [math.prod(shape), gap] if gap else [math.prod(shape)]
    pieces = buffer.split(sizes)
    return [pieces[i] if len(shape) == 1 else pieces[i].view(shape) for i, shape in zip(first, shapes)]


def _distinct(params):
    """``params`` with each repeat of a tensor replaced by a view of it. A block reads a parameter both cast and as
    it is (a bias: cast for the forward, fp32 for its gradient) and gives it twice; torch.compile traces no
    Function that gets one tensor twice."""
    return [p.view_as(p) if any(p is q for q in params[:i]) else p for i, p in enumerate(params)]


class StoredParameters(torch.nn.Module):
    """Lays a fixed set of parameters out in their stored channels at every call, in one gather: a padded stage's
    block would otherwise pad each parameter it reads on its own, about 25 launches a training step (forward and
    backward) for what one gather each way does (an eager step is bound by its host's launches).

    Args:
        cast_layouts, kept_layouts: ``(shape, pad)`` per parameter (:func:`stored_index`); the first are cast to
            the compute dtype at every call (the matmul weights), the others kept in their own dtype.
        align (int): elements at whose multiples each stored tensor starts (cuBLAS and Triton are fastest on
            aligned operands; 64 elements are 128 bytes of fp16 and 256 of fp32).

    The index tensors are buffers (not saved in state dicts): a stage's blocks, whose parameters have the same
    shapes, share one instance.
    """

    def __init__(self, cast_layouts, kept_layouts, align=64):
        super().__init__()
        index, inverse, self.offsets, self.shapes = stored_index(list(cast_layouts) + list(kept_layouts), align)
        self.cast_count = len(cast_layouts)
        self.register_buffer('index', index, persistent=False)
        self.register_buffer('inverse', inverse, persistent=False)

    def forward(self, blocks, dtype):
        """For ``blocks``, a list of ``(cast_params, kept_params)`` (one block's, or a stage's blocks' whose
        parameters have this module's shapes): ``cast_params`` stored and cast to ``dtype``, ``kept_params`` stored,
        as a list of ``(cast, kept)`` lists of tensors, all in one gather each way."""
        params = [p for cast_params, kept_params in blocks for p in _distinct(list(cast_params) + list(kept_params))]
        stored = _GatherStored.apply(self.index, self.inverse, self.offsets, self.shapes, self.cast_count, dtype,
                                     *params)
        per_block = len(self.shapes)
        return [(list(stored[b:b + self.cast_count]), list(stored[b + self.cast_count:b + per_block]))
                for b in range(0, len(stored), per_block)]

"""The scan op that GroupMamba layers call: a PyTorch custom op (``mmgroupmamba::selective_scan_fwd`` and
``..._bwd``) that runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere.

With fake (meta) implementations and a registered autograd formula, the scan traces under ``torch.compile``
without graph breaks and with symbolic sizes; on CUDA its Triton launches become nodes of the compiled graph
(``ops_util.fused_op``).
"""
import torch

from .dispatch import triton_module, use_triton
from .ops_util import cast, empty, fused_op, reduced_dtype, reference_grads
from .reference import selective_scan_reference

# Tiling knobs, forward then backward: (block_t, block_c, num_warps, chunk_len, stages); 0 = the heuristics'
# choice. The order is choose_config's.
TILING_KEYS = ('block_t', 'block_c', 'num_warps', 'chunk_len', 'stages')
AUTO_TILING = (0,) * (2 * len(TILING_KEYS))


def _tiling_kwargs(tiling):
    forward, backward = tiling[:len(TILING_KEYS)], tiling[len(TILING_KEYS):]
    return {k: ((f or None), (b or None)) for k, f, b in zip(TILING_KEYS, forward, backward)}


def _shared_row_layout(B, C):
    """``B`` and ``C`` as the kernels read them: rows of unit-stride groups, one row stride for both.

    The layer computes them in one projection and splits it, so they usually are two column slices of one
    ``(batch, L, 2 * groups)`` tensor: read in place, without the two copies ``.contiguous()`` would make.
    """
    if B.stride() == C.stride() and _rows_readable(B):
        return B, C
    return B.contiguous(), C.contiguous()


def _rows_readable(t):
    """Whether the kernels can read ``t`` ``(batch, L, n)`` in place: rows of unit-stride columns, one row stride,
    the batch's rows one after another (a column slice of a wider projection is)."""
    return t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1)


def _triton_inputs(u, delta, A_logs, B, C, D, delta_bias):
    # The kernels index channels-last tensors and accumulate in fp32 whatever the dtypes (autocast may hand
    # over bf16 activations with fp32 parameters; each is read in its own dtype). delta, B and C are read in
    # place where they are slices of one projection (the layer computes all three in one matmul).
    B, C = _shared_row_layout(B, C)
    delta = delta if _rows_readable(delta) else delta.contiguous()
    return (u.contiguous(), delta, A_logs.contiguous(), B, C, D.contiguous(), delta_bias.contiguous())


def _scan_fwd_reference(u, delta, A_logs, B, C, D, delta_bias, height, width, tiling, save_states):
    with torch.no_grad():
        y = selective_scan_reference(u, delta, A_logs, B, C, D, delta_bias, (height, width))
    return y.contiguous(), empty(u, torch.float32)


@fused_op('mmgroupmamba::selective_scan_fwd', reference=_scan_fwd_reference)
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A_logs: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor, delta_bias: torch.Tensor, height: int, width: int, tiling: list[int],
                       save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, states)``: states are the Triton backward's checkpoints (empty on the reference path or when
    ``save_states`` is off)."""
    ts = triton_module('triton_scan', u.device)
    inputs = _triton_inputs(u, delta, A_logs, B, C, D, delta_bias)
    cfg = ts.choose_config(inputs[0], **_tiling_kwargs(tiling))
    y, states = ts.scan_forward(*inputs, (height, width), cfg, save_states)
    return y, (states if save_states else empty(u, torch.float32))


@selective_scan_fwd.register_fake
def _(u, delta, A_logs, B, C, D, delta_bias, height, width, tiling, save_states):
    if save_states and use_triton(u):
        ts = triton_module('triton_scan', u.device)
        bwd_block_t = tiling[len(TILING_KEYS)]
        stride = ts.state_stride(bwd_block_t) if bwd_block_t else ts.STATE_STRIDE
        batch, length, channels = u.shape
        states = u.new_empty((batch, (length + stride - 1) // stride * channels), dtype=torch.float32)
    else:
        states = empty(u, torch.float32)
    return torch.empty_like(u, memory_format=torch.contiguous_format), states


def _scan_bwd_reference(dy, u, delta, A_logs, B, C, D, delta_bias, states, height, width, tiling):
    (du, ddelta, dA_logs, dB, dC, dD, dbias), _ = reference_grads(
        lambda *t: selective_scan_reference(*t, (height, width)), (u, delta, A_logs, B, C, D, delta_bias), dy)
    reduced = reduced_dtype(u)
    return du, ddelta, torch.stack([dA_logs, dD, dbias]).to(reduced), torch.stack([dB, dC]).to(reduced)


@fused_op('mmgroupmamba::selective_scan_bwd', reference=_scan_bwd_reference)
def selective_scan_bwd(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A_logs: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor,
                       height: int, width: int, tiling: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """``(du, ddelta, dADb, dBC)``: du and ddelta in their inputs' dtypes, ``dADb`` the ``(3, C)`` gradients of
    A_logs, D and delta_bias and ``dBC`` the ``(2, batch, L, 4)`` gradients of B and C (fp32, fp64 for fp64 inputs);
    :func:`_scan_backward` takes them apart."""
    ts = triton_module('triton_scan', u.device)
    inputs = _triton_inputs(u, delta, A_logs, B, C, D, delta_bias)
    cfg = ts.choose_config(inputs[0], **_tiling_kwargs(tiling))
    return ts.scan_backward(dy, *inputs, (height, width), states, cfg)


@selective_scan_bwd.register_fake
def _(dy, u, delta, A_logs, B, C, D, delta_bias, states, height, width, tiling):
    contiguous = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(u, **contiguous), torch.empty_like(delta, **contiguous),
            A_logs.new_empty((3, *A_logs.shape), dtype=reduced_dtype(u)),
            B.new_empty((2, *B.shape), dtype=reduced_dtype(u)))


def _setup_scan_context(ctx, inputs, output):
    u, delta, A_logs, B, C, D, delta_bias, height, width, tiling, _ = inputs
    ctx.save_for_backward(u, delta, A_logs, B, C, D, delta_bias, output[1])
    ctx.hw, ctx.tiling = (height, width), tiling
    ctx.set_materialize_grads(False)  # states get no gradient: no zero fill for it in every backward


def _scan_backward(ctx, dy, _dstates):
    saved = ctx.saved_tensors  # read once: checkpointing's saved tensors may be unpacked only once
    u, delta, A_logs, B, C, D, delta_bias, states = saved
    du, ddelta, dADb, dBC = selective_scan_bwd(dy, *saved, *ctx.hw, ctx.tiling)
    dA_logs, dD, dbias = dADb
    # B and C come as slices of one projection, in one dtype: one cast for both (none where it is fp32).
    dB, dC = cast(dBC, torch.promote_types(B.dtype, C.dtype))
    return (du, ddelta, cast(dA_logs, A_logs.dtype), cast(dB, B.dtype), cast(dC, C.dtype), cast(dD, D.dtype),
            cast(dbias, delta_bias.dtype), None, None, None, None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_scan_context)


def _check_shapes(u, delta, A_logs, B, C, D, delta_bias, hw):
    batch, length, channels = u.shape
    groups = B.shape[-1]
    if hw[0] * hw[1] != length:
        raise ValueError(f'hw={tuple(hw)} does not match {length} positions')
    if groups != 4 or channels % groups:
        raise ValueError(f'expected 4 channel groups dividing {channels} channels, got B of shape {tuple(B.shape)}')
    if delta.shape != u.shape or B.shape != C.shape or B.shape[:2] != (batch, length):
        raise ValueError('u/delta must be (batch, H*W, channels) and B/C (batch, H*W, 4)')
    for name, t in (('A_logs', A_logs), ('D', D), ('delta_bias', delta_bias)):
        if t.shape != (channels,):
            raise ValueError(f'{name} must have shape ({channels},), got {tuple(t.shape)}')


def selective_scan(u, delta, A_logs, B, C, D, delta_bias, hw, *, tiling=None):
    """Selective scan of all channel groups of one GroupMamba layer, each in its own direction.

    Tensors are channels-last, positions in row-major order, as the layer's linear layers produce them:

    Args:
        u (Tensor): ``(batch, H*W, channels)`` scan input; channels are ``groups`` equal groups.
        delta (Tensor): ``(batch, H*W, channels)`` step sizes before ``softplus(delta + delta_bias)``.
        A_logs (Tensor): ``(channels,)`` logs of the state decay rates' magnitudes, as the layer stores them: the
            kernels use ``A = -exp(A_logs)`` (two launches fewer a layer than computing A outside, each way).
        B (Tensor): ``(batch, H*W, groups)`` input projection of each group (``d_state=1``).
        C (Tensor): ``(batch, H*W, groups)`` output projection of each group.
        D (Tensor): ``(channels,)`` skip weights.
        delta_bias (Tensor): ``(channels,)``.
        hw (tuple[int, int]): the map's height and width; group ``g`` scans in
            ``SCAN_DIRECTIONS[g]`` order over it.
        tiling (dict, optional): Triton tilings to force (``block_t``, ``block_c``, ``num_warps``,
            ``chunk_len``, ``stages``; each one value or a ``(forward, backward)`` pair), for tests and
            benchmarks.

    Returns:
        Tensor: ``(batch, H*W, channels)`` in ``u``'s dtype, computed in fp32.

    The implementation follows ``MMGM_KERNELS`` (see :mod:`mmgroupmamba.kernels.dispatch`).
    """
    _check_shapes(u, delta, A_logs, B, C, D, delta_bias, hw)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A_logs, B, C, D, delta_bias))
    y, _ = selective_scan_fwd(u, delta, A_logs, B, C, D, delta_bias, hw[0], hw[1], _tiling_list(tiling), save)
    return y


def _tiling_list(tiling):
    if not tiling:
        return list(AUTO_TILING)
    unknown = set(tiling) - set(TILING_KEYS)
    if unknown:
        raise KeyError(f'unknown scan tiling keys {sorted(unknown)}; expected some of {TILING_KEYS}')
    pairs = [tiling.get(k) for k in TILING_KEYS]
    pairs = [tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in pairs]
    return [int(p[0] or 0) for p in pairs] + [int(p[1] or 0) for p in pairs]

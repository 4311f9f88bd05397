"""Triton kernels of the GroupMamba selective scan (``d_state=1``), forward and backward.

The plain PyTorch reference lives beside this file (``reference.py``); ``scan.py`` chooses between the two
and wraps these launchers in an autograd Function. README.md in this folder describes the design; in short:

* Layout: ``u``, ``delta``, ``y`` and the gradients stay channels-last ``(batch, L, channels)`` with ``L``
  in row-major order; ``B`` and ``C`` are ``(batch, L, 4)``. A program owns one batch item, one of the 4
  channel groups, a block of ``BLOCK_C`` channels of that group and a chunk of scan steps. It walks its
  chunk in tiles of ``BLOCK_T`` steps; a tile is a ``(BLOCK_T, BLOCK_C)`` block of registers whose rows are
  ``BLOCK_C`` consecutive channels of one position, so every row is one contiguous load.
* Directions: scan step ``t`` of group ``g`` reads row-major position ``_position(t, g)``; the 4 groups
  differ only in that index arithmetic, so one launch covers all of them and nothing is ever flipped or
  transposed in memory.
* Inside a tile the recurrence ``h_t = a_t h_{t-1} + x_t`` is an associative scan over pairs ``(a, x)``;
  tiles are chained through the carried state. Long sequences are split into chunks over programs: pass 1
  summarises every chunk (product of decays, end state from a zero start); pass 2 re-runs each chunk from
  its true starting state, which its program composes from the summaries of the chunks before it.
* Backward runs the same way in reverse time. It recomputes the hidden states of a tile from the state the
  forward pass saved at the tile's start (one state every ``BLOCK_T`` steps), never from a stored copy of
  every state. Nothing uses atomics: per-program partial sums go to buffers that PyTorch reduces in a fixed
  order, so the gradients are bitwise reproducible.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors
from .ops_util import cdiv, launchable, next_power_of_2, size_hint

GROUPS = 4


# --------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _compose(a1, x1, a2, x2):
    # (a1, x1) is the earlier affine map h -> a1 h + x1, (a2, x2) the later one; the result applies both.
    # tl.associative_scan keeps this order for reverse scans as well (its accumulator is the later part,
    # the new element the earlier one, and the formula below composes them the same way).
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _position(t, g, L, H, W):
    # Row-major position visited at scan step t by group g: g=0 row-major, g=1 column-major,
    # g=2 row-major reversed, g=3 column-major reversed (SCAN_DIRECTIONS order).
    tt = tl.where(g >= 2, L - 1 - t, t)
    tt = tl.maximum(tt, 0)  # keeps masked-off steps (t >= L) at an in-range address
    column_major = (tt % H) * W + tt // H
    return tl.where((g % 2) == 1, column_major, tt)


@triton.jit
def _softplus(z):
    return _softplus_sigmoid(z)[0]  # the compiler drops the unused sigmoid


@triton.jit
def _softplus_sigmoid(z):
    """softplus(z) and sigmoid(z), its derivative, from one exp: with e = exp(-|z|), sigmoid(z) is 1 / (1 + e)
    for z >= 0 and e / (1 + e) below. softplus(z) = max(z, 0) + log1p(e), with log1p written accurately via
    log(w) * e / (w - 1) (Goldberg's trick) because a plain log(1 + e) loses all digits of a small e."""
    e = tl.exp(-tl.abs(z))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.maximum(z, 0.0) + log1p, tl.where(z >= 0.0, 1.0, e) / w


@triton.jit
def _program_block(n_cblocks, K, BLOCK_C: tl.constexpr):
    # Axis 0 of the grid enumerates (batch item, group, channel block of the group), channel blocks fastest.
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    g = (pid // n_cblocks) % 4
    b = pid // (n_cblocks * 4)
    cidx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cidx < K
    return b, g, cb, g * K + cidx, cmask


@triton.jit
def _row(tile, rows, r):
    # Row r of a (BLOCK_T, BLOCK_C) tile as a (BLOCK_C,) vector; the masked sum adds exact zeros only.
    return tl.sum(tl.where(rows[:, None] == r, tile, 0.0), axis=0)


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _add4(a1, b1, c1, d1, a2, b2, c2, d2):
    return a1 + a2, b1 + b2, c1 + c2, d1 + d2


@triton.jit
def _two_rows(tile1, tile2, rows, r):
    """Row r of two tiles, in one reduction: a tile's rows are spread over warps, so every reduction over them
    is a round trip through shared memory with its barriers, and one reduction of a tuple makes one trip."""
    at = rows[:, None] == r
    return tl.reduce((tl.where(at, tile1, 0.0), tl.where(at, tile2, 0.0)), 0, _add2)


# --------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_indices(L, CH, K, bc_stride, n_cblocks, n_chunks, chunk0, BLOCK_C: tl.constexpr):
    """This program's batch item, group, channel block, channels, chunk and row offsets.

    No pointers come in: torch.compile decides which tensors a kernel writes by following its store
    addresses back through every value they derive from, and through a helper's call into all of its
    arguments; a pointer among them would count as written, and the compiled graph would copy that tensor
    before every launch (the scan's A_logs and delta bias were, until this split)."""
    b, g, cb, ch, cmask = _program_block(n_cblocks, K, BLOCK_C)
    chunk = tl.program_id(1) + chunk0
    batch_off = b.to(tl.int64) * L * CH
    bc_off = b.to(tl.int64) * L * bc_stride + g  # B and C rows may be slices of one wider projection
    summary_off = (b.to(tl.int64) * n_chunks + chunk) * CH + ch
    return b, g, cb, ch, cmask, chunk, batch_off, bc_off, summary_off


@triton.jit
def _chunk_params(A_logs_ptr, bias_ptr, ch, cmask):
    """A and the delta bias of the program's channels."""
    A = -tl.exp(tl.load(A_logs_ptr + ch, mask=cmask, other=0.0).to(tl.float32))  # the layer stores A_logs
    bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    return A, bias


@triton.jit
def _carry_into(P_ptr, E_ptr, b, chunk, n_chunks, CH, ch, cmask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                REVERSE: tl.constexpr):
    """What enters ``chunk`` of a split scan (the state forward, dL/dh backward, ``REVERSE``): chunk k maps what
    enters it to ``P[k] * value + E[k]``, so compose the summaries of the chunks before it in time (after it
    in step order, backward) from a zero start, ``BLOCK_T`` chunks at a time. Each program composes its own
    instead of reading the result of a separate propagation launch: one launch fewer per call and direction
    for a host that issues every launch (#14), at up to a few light tiles more per program (README.md)."""
    carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    base = b.to(tl.int64) * n_chunks * CH
    n_feeding = (n_chunks - 1 - chunk) if REVERSE else chunk
    for i in range(0, tl.cdiv(n_feeding, BLOCK_T)):
        if REVERSE:
            k = n_chunks - (i + 1) * BLOCK_T + rows  # from the last chunk down; may run below 0, masked
            kmask = k > chunk
        else:
            k = i * BLOCK_T + rows
            kmask = k < chunk
        mask = kmask[:, None] & cmask[None, :]
        off = base + k[:, None] * CH + ch[None, :]
        p = tl.load(P_ptr + off, mask=mask, other=1.0)  # masked chunks are the identity map
        e = tl.load(E_ptr + off, mask=mask, other=0.0)
        p_cum, e_cum = tl.associative_scan((p, e), 0, _compose, reverse=REVERSE)
        edge = 0 if REVERSE else BLOCK_T - 1  # the row holding the whole tile's composition
        carry = _row(p_cum, rows, edge) * carry + _row(e_cum, rows, edge)
    return carry


# Sizes that only index rows or count steps are not specialised, so one compiled kernel serves every map
# size; CH and K stay specialised because their divisibility lets rows load as 16-byte vectors.
_RUNTIME_SIZES = ['batch', 'L', 'H', 'W', 'n_cblocks', 'chunk_len', 'n_chunks', 'n_states', 'chunk0']


@triton.jit(do_not_specialize=_RUNTIME_SIZES[1:])
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_logs_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr,
    st_ptr,  # (batch, n_states, CH) fp32: state entering every STATE_T-th step, kept for the backward pass
    P_ptr, E_ptr,  # (batch, n_chunks, CH) fp32 chunk summaries: written by pass 1 of a split, read by pass 2
    L, H, W, CH, K, bc_stride, dt_stride, n_cblocks, chunk_len, n_chunks, n_states, chunk0,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STATE_T: tl.constexpr, STAGES: tl.constexpr,
    HAS_HIN: tl.constexpr, SAVE_STATES: tl.constexpr, SUMMARY: tl.constexpr,
):
    b, g, cb, ch, cmask, chunk, batch_off, bc_off, summary_off = _chunk_indices(
        L, CH, K, bc_stride, n_cblocks, n_chunks, chunk0, BLOCK_C)
    dt_base = b.to(tl.int64) * L * dt_stride  # delta's rows may be slices of one wider projection too
    A, bias = _chunk_params(A_logs_ptr, bias_ptr, ch, cmask)
    if HAS_HIN:
        h = _carry_into(P_ptr, E_ptr, b, chunk, n_chunks, CH, ch, cmask, BLOCK_T, BLOCK_C, False)
    else:
        h = tl.zeros([BLOCK_C], dtype=tl.float32)
    if not SUMMARY:
        D = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if SUMMARY:
        decay = tl.full([BLOCK_C], 1.0, dtype=tl.float32)

    rows = tl.arange(0, BLOCK_T)
    t0 = chunk * chunk_len
    t_end = tl.minimum(t0 + chunk_len, L)
    if SAVE_STATES:
        st_base = b.to(tl.int64) * n_states * CH
        # The checkpoint at the chunk's first step, if one falls there; the others come from the tiles.
        tl.store(st_ptr + st_base + (t0 // STATE_T) * CH + ch, h, mask=cmask & (t0 % STATE_T == 0))
    # STAGES > 1: Triton's pipeliner loads tiles ahead into shared memory (the loads depend on the step
    # index only, the carried state on the scan).
    for ts in tl.range(t0, t_end, BLOCK_T, num_stages=STAGES):
        t = ts + rows
        tmask = t < t_end
        mask = tmask[:, None] & cmask[None, :]
        pos = _position(t, g, L, H, W)
        off = batch_off + pos[:, None] * CH + ch[None, :]
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + dt_base + (pos[:, None] * dt_stride + ch[None, :]), mask=mask, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + bc_off + pos * bc_stride, mask=tmask, other=0.0).to(tl.float32)
        dt = _softplus(dt + bias[None, :])
        # Steps past the end become the identity map (a=1, x=0) so the last row carries the true state.
        a = tl.where(mask, tl.exp(dt * A[None, :]), 1.0)
        x = dt * Bt[:, None] * u
        a_cum, x_cum = tl.associative_scan((a, x), 0, _compose)
        hs = a_cum * h[None, :] + x_cum
        if SUMMARY:
            tile_decay, h = _two_rows(a_cum, hs, rows, BLOCK_T - 1)
            decay = decay * tile_decay
        else:
            Ct = tl.load(C_ptr + bc_off + pos * bc_stride, mask=tmask, other=0.0).to(tl.float32)
            y = Ct[:, None] * hs + D[None, :] * u
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
            h = _row(hs, rows, BLOCK_T - 1)
        if SAVE_STATES:
            # hs row t is the state entering step t+1: keep it where t+1 is a checkpoint step (inside this
            # chunk; the next chunk's program writes its own first one). The checkpoint stride is the
            # backward pass's tile, independent of this tile, so both can be tuned separately.
            save = ((t + 1) % STATE_T == 0) & (t + 1 < t_end)
            tl.store(st_ptr + st_base + ((t + 1) // STATE_T)[:, None] * CH + ch[None, :], hs,
                     mask=save[:, None] & cmask[None, :])
    if SUMMARY:
        tl.store(P_ptr + summary_off, decay, mask=cmask)
        tl.store(E_ptr + summary_off, h, mask=cmask)


# --------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_RUNTIME_SIZES + ['bc_part_stride', 'adb_part_stride'])
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_logs_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr,
    st_ptr,  # (batch, n_states, CH) fp32 forward state entering every STATE_T-th step
    du_ptr, ddt_ptr,  # (batch, L, CH) in u's / delta's dtype (ddelta contiguous whatever delta's row stride)
    # Partial sums, each set in one buffer given whole (views of it written by the kernel would be cloned and
    # scattered back under torch.compile: copy kernels), its parts `*_part_stride` apart:
    dBC_ptr,  # (2, n_cblocks, batch, L, 4) fp32, dB then dC: sums over this program's channels
    dADb_ptr,  # (3, batch, n_chunks, CH) fp32, dA_logs, dD, dbias: sums over this program's steps
    P_ptr, E_ptr,  # (batch, n_chunks, CH) fp32 chunk summaries: written by pass 1 of a split, read by pass 2
    batch, L, H, W, CH, K, bc_stride, dt_stride, n_cblocks, chunk_len, n_chunks, n_states, chunk0, bc_part_stride,
    adb_part_stride,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STATE_T: tl.constexpr, STAGES: tl.constexpr,
    HAS_GIN: tl.constexpr, SUMMARY: tl.constexpr,
):
    # With dh_t = dL/dh_t, the adjoint recurrence runs backward in time:
    #     dh_t = C_t dy_t + a_{t+1} dh_{t+1}
    # and every gradient is local once h_{t-1} and dh_t are known:
    #     du_t = D dy_t + dh_t delta_t B_t               dB_t = sum_c dh_t delta_t u_t
    #     dC_t = sum_c dy_t h_t                          dD = sum dy_t u_t
    #     ddelta_t = dh_t (B_t u_t + A a_t h_{t-1})      dA = sum dh_t delta_t a_t h_{t-1}
    # and a_t h_{t-1} = h_t - x_t needs no shifted copy of the states.
    b, g, cb, ch, cmask, chunk, batch_off, bc_off, summary_off = _chunk_indices(
        L, CH, K, bc_stride, n_cblocks, n_chunks, chunk0, BLOCK_C)
    dt_base = b.to(tl.int64) * L * dt_stride
    A, bias = _chunk_params(A_logs_ptr, bias_ptr, ch, cmask)
    if HAS_GIN:  # dL/dh at the first step after this chunk
        carry = _carry_into(P_ptr, E_ptr, b, chunk, n_chunks, CH, ch, cmask, BLOCK_T, BLOCK_C, True)
    else:
        carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    D = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if SUMMARY:
        decay = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    else:
        dA_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dbc_off = (cb.to(tl.int64) * batch + b) * L * 4 + g  # this channel block's slice of the partials

    rows = tl.arange(0, BLOCK_T)
    t0 = chunk * chunk_len
    t_end = tl.minimum(t0 + chunk_len, L)
    n_local = tl.cdiv(t_end - t0, BLOCK_T)
    for i in tl.range(0, n_local, num_stages=STAGES):
        ts = t0 + (n_local - 1 - i) * BLOCK_T  # tiles in reverse time order
        t = ts + rows
        tmask = t < t_end
        mask = tmask[:, None] & cmask[None, :]
        pos = _position(t, g, L, H, W)
        off = batch_off + pos[:, None] * CH + ch[None, :]
        # a_{t+1}: the decay of the next step, read at that step's position (a cached re-read, since the
        # previous tile or this one already loaded it). Past the sequence end it is 0 (dh_L = 0 anyway).
        nmask_t = (t + 1) < L
        nmask = nmask_t[:, None] & cmask[None, :]
        pos_next = _position(t + 1, g, L, H, W)
        dt_next = tl.load(dt_ptr + dt_base + (pos_next[:, None] * dt_stride + ch[None, :]), mask=nmask,
                          other=0.0).to(tl.float32)
        a_next = tl.where(nmask, tl.exp(_softplus(dt_next + bias[None, :]) * A[None, :]), 0.0)
        # Steps past the chunk end are the identity map, so the carry passes through them unchanged.
        a_next = tl.where(tmask[:, None], a_next, 1.0)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_off + pos * bc_stride, mask=tmask, other=0.0).to(tl.float32)
        r_cum, q_cum = tl.associative_scan((a_next, Ct[:, None] * dy), 0, _compose, reverse=True)
        dh = r_cum * carry[None, :] + q_cum
        if SUMMARY:
            tile_decay, carry = _two_rows(r_cum, dh, rows, 0)
            decay = decay * tile_decay
        else:
            u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dt_raw = (tl.load(dt_ptr + dt_base + (pos[:, None] * dt_stride + ch[None, :]), mask=mask, other=0.0)
                      .to(tl.float32) + bias[None, :])
            Bt = tl.load(B_ptr + bc_off + pos * bc_stride, mask=tmask, other=0.0).to(tl.float32)
            dt, sig = _softplus_sigmoid(dt_raw)
            a = tl.where(mask, tl.exp(dt * A[None, :]), 1.0)
            Bu = Bt[:, None] * u
            x = dt * Bu
            h0 = tl.load(st_ptr + (b.to(tl.int64) * n_states + ts // STATE_T) * CH + ch, mask=cmask,
                         other=0.0)
            a_cum, x_cum = tl.associative_scan((a, x), 0, _compose)
            h = a_cum * h0[None, :] + x_cum
            ah = h - x  # a_t h_{t-1}
            du = D[None, :] * dy + dh * dt * Bt[:, None]
            ddt = dh * (Bu + A[None, :] * ah)
            ddt_raw = tl.where(mask, ddt * sig, 0.0)
            tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddt_ptr + off, ddt_raw.to(ddt_ptr.dtype.element_ty), mask=mask)
            # The carry and the three sums over steps in one reduction, the two sums over channels in another.
            carry, dA_t, dD_t, dbias_t = tl.reduce(
                (tl.where(rows[:, None] == 0, dh, 0.0), tl.where(mask, dh * dt * ah, 0.0), dy * u, ddt_raw),
                0, _add4)
            dA_acc += dA_t
            dD_acc += dD_t
            dbias_acc += dbias_t
            dB_t, dC_t = tl.reduce((tl.where(mask, dh * dt * u, 0.0), tl.where(mask, dy * h, 0.0)), 1, _add2)
            tl.store(dBC_ptr + dbc_off + pos * 4, dB_t, mask=tmask)
            tl.store(dBC_ptr + bc_part_stride + dbc_off + pos * 4, dC_t, mask=tmask)
    if SUMMARY:
        tl.store(P_ptr + summary_off, decay, mask=cmask)
        tl.store(E_ptr + summary_off, carry, mask=cmask)
    else:
        tl.store(dADb_ptr + summary_off, dA_acc * A, mask=cmask)  # dL/dA_logs = dL/dA * A
        tl.store(dADb_ptr + adb_part_stride + summary_off, dD_acc, mask=cmask)
        tl.store(dADb_ptr + 2 * adb_part_stride + summary_off, dbias_acc, mask=cmask)


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------
class PassConfig:
    """Tiling of one direction (forward or backward) of a scan call.

    The tiles are plain ints, chosen for one example size; the counts that follow from a call's sizes
    (programs, chunks) are computed by the launchers from the sizes they are given, which are symbolic while
    ``torch.compile`` traces, so one traced graph serves other sizes.
    """

    def __init__(self, channels, block_t, block_c, num_warps, chunk_len, stages):
        self.block_t, self.block_c, self.num_warps, self.stages = block_t, block_c, num_warps, stages
        self.n_cblocks = cdiv(channels // GROUPS, block_c)
        # A chunk is a whole number of tiles, so tiles never straddle two programs.
        self.chunk_len = max(block_t, cdiv(max(chunk_len, 1), block_t) * block_t)

    def programs(self, batch):
        return batch * GROUPS * self.n_cblocks

    def launch_meta(self, state_t):
        return dict(BLOCK_T=self.block_t, BLOCK_C=self.block_c, STATE_T=state_t, STAGES=self.stages,
                    num_warps=self.num_warps)

    def n_chunks(self, length):
        return cdiv(length, self.chunk_len)

    def __repr__(self):
        return (f'(block_t={self.block_t}, block_c={self.block_c}, num_warps={self.num_warps}, '
                f'chunk_len={self.chunk_len}, stages={self.stages})')


# The forward saves the state entering every STATE_STRIDE-th step (fewer where a backward tile is shorter).
# A fixed stride makes the number of saved states a plain function of the length, ceil(L / 32), which
# torch.compile can carry as a symbolic size without specialising on the map size.
STATE_STRIDE = 32


def state_stride(bwd_block_t):
    """Checkpoint stride for a backward tile of ``bwd_block_t`` (a power of 2): every tile starts on one."""
    return math.gcd(STATE_STRIDE, bwd_block_t)


class ScanConfig:
    """Tilings of the forward and backward kernels of one call, and the checkpoint stride that links them.

    The forward pass saves the state entering every ``state_t``-th step; every backward tile starts on such a
    step and recomputes its states from that one checkpoint.
    """

    def __init__(self, channels, fwd, bwd):
        self.per_group = channels // GROUPS
        self.fwd, self.bwd = fwd, bwd
        self.state_t = state_stride(bwd.block_t)

    def n_states(self, length):
        return cdiv(length, self.state_t)

    def __repr__(self):
        return f'ScanConfig(fwd={self.fwd}, bwd={self.bwd})'


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pass_config(batch, length, channels, sms, block_t, block_c, num_warps, chunk_len, stages, backward):
    # Defaults from the tiling sweeps of benchmarks/scan_kernels.py on an H100 (README.md). The kernels are bound by
    # the per-tile scan work (shuffles, barriers), not by DRAM, so short tiles with 8-16 elements per thread
    # and many resident programs won; see README.md for the numbers.
    per_group = channels // GROUPS
    # Too few batch x groups x channel-block programs to fill the GPU (the detection step's batch of 2): the
    # sequence is split into chunks below, so programs are many whatever the tile. There tiles of 512 elements
    # measured fastest (thirty-third session, kernels/README.md): 16 channels by 32 steps where a group's channels
    # are a multiple of 16, else 32 by 16 (stage 3's 88), the forward in two warps and the backward in one.
    split_regime = batch * GROUPS * cdiv(per_group, 16) < 2 * sms
    if block_c is None:
        if split_regime:
            block_c = 16 if per_group % 16 == 0 else 32
        elif backward:
            block_c = 32 if (per_group % 32 == 0 or per_group % 16) else 16
        else:
            block_c = 32 if per_group % 32 == 0 else 16
        block_c = min(block_c, next_power_of_2(per_group))
    if block_t is None:
        block_t = 512 // block_c if split_regime else (64 if length >= 2048 else 32)
        block_t = max(1, min(block_t, next_power_of_2(length)))
    if num_warps is None:
        if split_regime:
            num_warps = 1 if backward else 2
        else:
            per_thread = 16 if backward and per_group % 16 == 0 else 8
            num_warps = min(8, max(1, block_t * block_c // (32 * per_thread)))
    if chunk_len is None:
        programs = batch * GROUPS * cdiv(per_group, block_c)
        chunk_len = length
        if programs < 2 * sms:
            # Split only when batch x groups x channel blocks cannot fill the GPU, since a split reads the
            # inputs twice. Aim for ~8 programs a multiprocessor with chunks of >= 4 tiles, so the summary
            # pass and the programs' composition of the summaries stay small next to the scan itself.
            wanted = cdiv(8 * sms, programs)
            chunk_len = max(4 * block_t, cdiv(length, wanted))
    # Software pipelining of the tile loop (Triton's num_stages): not yet timed, so off (1) by default;
    # benchmarks/scan_kernels.py --sweep times 1 to 4.
    return PassConfig(channels, block_t, block_c, num_warps, chunk_len, stages or 1)


def choose_config(u, chunk_len=None, block_t=None, block_c=None, num_warps=None, stages=None):
    """Pick the tilings for ``u`` of shape ``(batch, L, channels)``.

    Each argument is one value for both passes or a ``(forward, backward)`` pair; ``None`` picks by
    heuristics. ``chunk_len`` (rounded up to whole tiles) forces the sequence split; by default the
    sequence is split only when there are too few ``batch x groups x channel blocks`` programs for the GPU.
    """
    args = tuple(_pair(v) for v in (block_t, block_c, num_warps, chunk_len, stages))
    return _config_for(*(size_hint(n) for n in u.shape), multiprocessors(u.device), args)


@functools.lru_cache(maxsize=1024)  # every layer of every step asks again, and the answer is pure
def _config_for(batch, length, channels, sms, args):
    fwd = _pass_config(batch, length, channels, sms, *(a[0] for a in args), backward=False)
    bwd = _pass_config(batch, length, channels, sms, *(a[1] for a in args), backward=True)
    return ScanConfig(channels, fwd, bwd)


def _summaries(summarize, batch, n_chunks, channels, device):
    """Pass 1 of a split scan: ``summarize(P, E)`` launches the scan kernel in its summary mode, which writes
    each chunk's decay product ``P`` and end value ``E`` from a zero start (forward: every chunk but the last;
    backward: every chunk but the first, none of which anything flows from)."""
    P = torch.empty(batch, n_chunks, channels, device=device, dtype=torch.float32)
    E = torch.empty_like(P)
    summarize(P, E)
    return P, E


def scan_forward(u, delta, A_logs, B, C, D, delta_bias, hw, cfg, save_states):
    """Launch the forward scan. Returns ``y`` (u's dtype) and, if asked, the fp32 state checkpoints."""
    height, width = hw
    batch, length, channels = u.shape
    fc = cfg.fwd
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    y = torch.empty_like(u)
    n_states, n_chunks = cfg.n_states(length), fc.n_chunks(length)
    # One row of checkpoints per image, (batch, n_states * channels): no dimension is the checkpoint count
    # alone, which is 1 for short sequences (a stage-4 map of <= 32 tokens). Traced with symbolic sizes, such a
    # dimension's contiguity makes torch.compile guard on it being 1, and compile again when a new size flips it.
    states = torch.empty(batch, n_states * channels, **f32) if save_states else dummy
    grid_x = fc.programs(batch)
    common = (length, height, width, channels, cfg.per_group, B.stride(1), delta.stride(1), fc.n_cblocks,
              fc.chunk_len, n_chunks, n_states)
    meta = fc.launch_meta(cfg.state_t)
    split = bool(n_chunks > 1)
    # Pass 1 of a split scan: each chunk's summary (the last chunk's would flow nowhere).
    P, E = _summaries(
        lambda P, E: launchable(_scan_fwd_kernel)[(grid_x, n_chunks - 1)](
            u, delta, A_logs, B, C, D, delta_bias, y, dummy, P, E, *common, 0,
            HAS_HIN=False, SAVE_STATES=False, SUMMARY=True, **meta),
        batch, n_chunks, channels, u.device) if split else (dummy, dummy)
    # Pass 2 (the only pass without a split): the scan from each chunk's true starting state, which each
    # program composes from the summaries of the chunks before its own.
    launchable(_scan_fwd_kernel)[(grid_x, n_chunks)](
        u, delta, A_logs, B, C, D, delta_bias, y, states, P, E, *common, 0,
        HAS_HIN=split, SAVE_STATES=save_states, SUMMARY=False, **meta)
    return y, (states if save_states else None)


def scan_backward(dy, u, delta, A_logs, B, C, D, delta_bias, hw, states, cfg):
    """Gradients ``(du, ddelta, dADb, dBC)``: du and ddelta in their inputs' dtypes; ``dADb`` the fp32 ``(3, C)``
    gradients of A_logs, D and delta_bias and ``dBC`` the fp32 ``(2, batch, L, 4)`` gradients of B and C, each
    stack reduced in one launch."""
    height, width = hw
    batch, length, channels = u.shape
    bc = cfg.bwd
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    dy = dy.contiguous()
    du = torch.empty_like(u)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    # Partial sums of (dB, dC) and of (dA, dD, dbias), each pair/triple in one buffer: one reduction each.
    dBC_part = torch.empty(2, bc.n_cblocks, batch, length, GROUPS, **f32)
    n_chunks = bc.n_chunks(length)
    dADb_part = torch.empty(3, batch, n_chunks, channels, **f32)
    grid_x = bc.programs(batch)
    common = (batch, length, height, width, channels, cfg.per_group, B.stride(1), delta.stride(1), bc.n_cblocks,
              bc.chunk_len, n_chunks, cfg.n_states(length))
    meta = bc.launch_meta(cfg.state_t)
    split = bool(n_chunks > 1)
    # A split scan in reverse time: for chunks 1.., dL/dh at the chunk's first step given zero from the right.
    P, E = _summaries(
        lambda P, E: launchable(_scan_bwd_kernel)[(grid_x, n_chunks - 1)](
            u, delta, A_logs, B, C, D, delta_bias, dy, states, du, ddelta, dummy, dummy,
            P, E, *common, 1, 0, 0, HAS_GIN=False, SUMMARY=True, **meta),
        batch, n_chunks, channels, u.device) if split else (dummy, dummy)
    launchable(_scan_bwd_kernel)[(grid_x, n_chunks)](
        u, delta, A_logs, B, C, D, delta_bias, dy, states, du, ddelta, dBC_part, dADb_part, P, E,
        *common, 0, dBC_part.stride(0), dADb_part.stride(0), HAS_GIN=split, SUMMARY=False, **meta)
    # Fixed-order reductions of the per-program partial sums (deterministic, unlike atomics).
    dADb = dADb_part.sum((1, 2))
    dBC = dBC_part[:, 0] if bc.n_cblocks == 1 else dBC_part.sum(1)
    return du, ddelta, dADb, dBC


KERNEL = _scan_fwd_kernel  # what dispatch.kernels_interpreted inspects

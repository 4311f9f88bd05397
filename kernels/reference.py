"""Readable PyTorch reference of the GroupMamba selective scan (``d_state=1``).

For every channel ``c`` of a layer and every position ``t`` of its group's scan order::

    delta_t = softplus(delta_raw_t + delta_bias[c])
    h_t     = exp(delta_t * A[c]) * h_{t-1} + delta_t * B_t * u_t        (h_{-1} = 0, A = -exp(A_logs))
    y_t     = C_t * h_t + D[c] * u_t

The recurrence ``h_t = a_t * h_{t-1} + x_t`` is solved without a Python loop over positions: inside a chunk
of ``chunk`` positions through a masked matrix of decays ``exp(S_t - S_s)`` (``S`` the cumulative sum of
``log a``, so every exponent is <= 0 and nothing overflows), across chunks by solving the same recurrence on
the chunks' end states, recursively. All arithmetic is fp32 (or fp64 for fp64 inputs).
"""
import torch
import torch.nn.functional as F

from .directions import scan_order_index


def linear_recurrence(log_a, x, chunk=16):
    """Solve ``h_t = exp(log_a_t) * h_{t-1} + x_t`` (``h_{-1} = 0``) along the last dim.

    ``log_a`` must be <= 0 (a decay). Works for any length, including 1.
    """
    length = x.shape[-1]
    if length <= chunk:
        cum = log_a.cumsum(-1)
        # exponent[t, s] = S_t - S_s = sum of log_a over (s, t]; only s <= t contributes.
        exponent = cum.unsqueeze(-1) - cum.unsqueeze(-2)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        decay = exponent.masked_fill(~causal, float('-inf')).exp()
        return (decay @ x.unsqueeze(-1)).squeeze(-1)

    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    # Padding at the end (no decay, no input) changes nothing before it.
    log_a_c = F.pad(log_a, (0, pad)).unflatten(-1, (num_chunks, chunk))
    x_c = F.pad(x, (0, pad)).unflatten(-1, (num_chunks, chunk))
    local = linear_recurrence(log_a_c, x_c, chunk)  # each chunk started from a zero state
    # State at the end of every chunk, carried through all chunks before it.
    chunk_end = linear_recurrence(log_a_c.sum(-1), local[..., -1], chunk)
    state_in = F.pad(chunk_end[..., :-1], (1, 0))
    h = local + log_a_c.cumsum(-1).exp() * state_in.unsqueeze(-1)
    return h.flatten(-2)[..., :length]


def selective_scan_reference(u, delta, A_logs, B, C, D, delta_bias, hw):
    """Reference for :func:`mmgroupmamba.kernels.selective_scan` (same arguments, same result; the decay rates
    ``A = -exp(A_logs)``)."""
    batch, length, channels = u.shape
    groups = B.shape[-1]
    order = scan_order_index(hw, groups, u.device)  # (groups, L): scan step -> row-major position
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32

    def to_scan_order(t):  # (batch, L, groups, k) -> (batch, groups, k, L) in each group's order
        index = order.t()[None, :, :, None].expand(batch, length, groups, t.shape[-1])
        return t.to(compute).gather(1, index).permute(0, 2, 3, 1)

    u_s = to_scan_order(u.unflatten(-1, (groups, -1)))
    dt_s = to_scan_order(delta.unflatten(-1, (groups, -1)))
    b_s = to_scan_order(B.unsqueeze(-1))
    c_s = to_scan_order(C.unsqueeze(-1))
    A_g = -A_logs.to(compute).exp().view(groups, -1, 1)
    D_g = D.to(compute).view(groups, -1, 1)
    dt_s = F.softplus(dt_s + delta_bias.to(compute).view(groups, -1, 1))

    h = linear_recurrence(dt_s * A_g, dt_s * b_s * u_s)
    y_s = c_s * h + D_g * u_s  # (batch, groups, k, L)

    # Back to row-major positions: position p takes the scan step that visited it.
    step_of_position = order.argsort(dim=1)
    y = y_s.gather(3, step_of_position[None, :, None, :].expand_as(y_s))
    return y.permute(0, 3, 1, 2).reshape(batch, length, channels).to(u.dtype)


def modulated_layer_norm_reference(y, x, scale, weight, bias, eps):
    """``LayerNorm(y * x * scale[:, None, None, :])`` over the last dim, in y's dtype.

    Reference for :func:`mmgroupmamba.kernels.modulated_layer_norm`.
    """
    compute = torch.promote_types(y.dtype, torch.float32)
    modulated = y.to(compute) * x.to(compute) * scale.to(compute)[:, None, None, :]
    return F.layer_norm(modulated, y.shape[-1:], weight.to(compute), bias.to(compute), eps).to(y.dtype)


def group_layer_norm_reference(y, z, weight, bias, groups, eps, out_dtype):
    """LayerNorm over each of the ``groups`` channel groups of ``y``, then the affine, gated by ``silu(z)``
    unless ``z`` is None, in ``out_dtype``.

    Reference for :func:`mmgroupmamba.kernels.gated_group_norm` (and, ungated with one group, ``layer_norm``).
    """
    compute = torch.promote_types(y.dtype, torch.float32)
    normed = F.layer_norm(y.to(compute).unflatten(-1, (groups, -1)), (y.shape[-1] // groups,), eps=eps).flatten(-2)
    out = normed * weight.to(compute) + bias.to(compute)
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out.to(out_dtype)


def gated_group_norm_reference(y, z, weight, bias, groups, eps):
    """``(LayerNorm over each of the groups of channels of y) * weight + bias``, gated by ``silu(z)``, in the
    maps' promoted dtype (as the Triton kernel writes it, whatever the affine's dtype)."""
    return group_layer_norm_reference(y, z, weight, bias, groups, eps, torch.promote_types(y.dtype, z.dtype))


DWCONV_ACTIVATIONS = ('silu', 'gelu')


def check_dwconv_activation(activation):
    """Raise unless ``activation`` is one the fused depthwise conv supports."""
    if activation not in DWCONV_ACTIVATIONS:
        raise ValueError(f'activation={activation!r} is not supported; expected one of {DWCONV_ACTIVATIONS}')


def depthwise_conv_act_reference(x, weight, bias, activation):
    """``act(depthwise_conv3x3(x) + bias)`` of a channels-last map (zero padding 1, stride 1).

    Reference for :func:`mmgroupmamba.kernels.depthwise_conv_act`.

    Args:
        x (Tensor): ``(B, H, W, C)``, any strides.
        weight (Tensor): ``(C, 1, 3, 3)``.
        bias (Tensor): ``(C,)``.
        activation (str): ``'silu'`` or ``'gelu'`` (exact, erf).

    Returns:
        Tensor: contiguous ``(B, H, W, C)`` in x's dtype (computed in fp32 for half-precision x).
    """
    check_dwconv_activation(activation)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    pre = F.conv2d(x.to(compute).permute(0, 3, 1, 2), weight.to(compute), bias.to(compute), padding=1,
                   groups=x.shape[-1])
    out = F.silu(pre) if activation == 'silu' else F.gelu(pre)
    return out.permute(0, 2, 3, 1).to(x.dtype).contiguous()


def channel_affinity_dtype(pooled):
    """The dtype the channel affinity is computed and returned in: fp32, or fp64 for fp64 input. Not the
    input's: under autocast the pooled map is fp16/bf16, but the modulated LayerNorm that reads the scale
    computes in fp32, and the unfused model's scale was fp32 already (``skip_scale``, an fp32 parameter, times
    the affinity)."""
    return torch.promote_types(pooled.dtype, torch.float32)


def channel_affinity_reference(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, skip_scale):
    """``skip_scale * sigmoid(fc2(relu(fc1(pooled))))``: GroupMamba's channel affinity of the pooled map
    ``(B, C)`` through its ``C -> R -> C`` bottleneck, times the layer's skip scale (one element), as
    ``(B, C)`` in :func:`channel_affinity_dtype`.

    Reference for :func:`mmgroupmamba.kernels.channel_affinity`. Autocast is switched off inside: it would run
    the linear layers in half precision (the op's implementation runs under the caller's autocast).
    """
    compute = channel_affinity_dtype(pooled)
    with torch.autocast(pooled.device.type, enabled=False):
        hidden = F.relu(F.linear(pooled.to(compute), fc1_weight.to(compute), fc1_bias.to(compute)))
        logits = F.linear(hidden, fc2_weight.to(compute), fc2_bias.to(compute))
    return skip_scale.to(compute) * torch.sigmoid(logits)

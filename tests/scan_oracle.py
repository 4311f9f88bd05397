"""A slow, obviously-correct float64 loop of the GroupMamba scan, the oracle for both scan implementations."""
import torch
import torch.nn.functional as F


def scan_loop_float64(u, delta, A_logs, B, C, D, delta_bias, hw):
    height, width = hw
    batch, length, channels = u.shape
    groups = B.shape[-1]
    per_group = channels // groups
    u, delta, A_logs, B, C, D, delta_bias = (t.double() for t in (u, delta, A_logs, B, C, D, delta_bias))
    A = -A_logs.exp()
    rows = [(i, j) for i in range(height) for j in range(width)]
    cols = [(i, j) for j in range(width) for i in range(height)]
    orders = [rows, cols, rows[::-1], cols[::-1]]
    y = torch.zeros(batch, length, channels, dtype=torch.float64)
    for g in range(groups):
        chans = slice(g * per_group, (g + 1) * per_group)
        h = torch.zeros(batch, per_group, dtype=torch.float64)
        for i, j in orders[g]:
            p = i * width + j
            dt = F.softplus(delta[:, p, chans] + delta_bias[chans])
            h = torch.exp(dt * A[chans]) * h + dt * B[:, p, g:g + 1] * u[:, p, chans]
            y[:, p, chans] = C[:, p, g:g + 1] * h + D[chans] * u[:, p, chans]
    return y


def random_scan_inputs(batch, hw, channels, groups=4, dtype=torch.float32, generator=None, requires_grad=False):
    length = hw[0] * hw[1]

    def rand(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=generator) * scale + shift).to(dtype)
        return t.requires_grad_(requires_grad)

    return dict(
        u=rand(batch, length, channels),
        delta=rand(batch, length, channels, scale=1.5, shift=-1.0),
        # Decay rates A = -exp(A_logs) in (-2.05, -0.05].
        A_logs=(torch.rand(channels, generator=generator) * 2 + 0.05).log().to(dtype).requires_grad_(requires_grad),
        B=rand(batch, length, groups),
        C=rand(batch, length, groups),
        D=rand(channels),
        delta_bias=rand(channels, scale=0.5),
        hw=hw,
    )

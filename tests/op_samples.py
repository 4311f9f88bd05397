"""Sample arguments for every fused custom op, and ``torch.library.opcheck`` over them: run by
tests/test_compile.py on the CPU (both implementations) and by benchmarks/check_gpu.py on CUDA tensors."""
import torch

from mmgroupmamba.kernels.affinity import channel_affinity_bwd, channel_affinity_fwd
from mmgroupmamba.kernels.dwconv import dwconv_act_bwd, dwconv_act_forward
from mmgroupmamba.kernels.gated_norm import (
    gated_group_norm_bwd,
    gated_group_norm_fwd,
    modulated_layer_norm_bwd,
    modulated_layer_norm_fwd,
    residual_layer_norm_bwd,
    residual_layer_norm_fwd,
)
from mmgroupmamba.kernels.scan import AUTO_TILING, selective_scan_bwd, selective_scan_fwd
from scan_oracle import random_scan_inputs


def op_samples(gen, device='cpu'):
    """(op, args) for every custom op, with inputs as the layer passes them (B and C column slices, a
    channel slice into the conv, fp32 statistics); drawn on the CPU, then moved to ``device``
    (benchmarks/check_gpu.py runs the same checks on CUDA tensors)."""
    def draw(*shape, grad=False, rand=False):
        t = (torch.rand if rand else torch.randn)(*shape, generator=gen).to(device)
        return t.requires_grad_() if grad else t

    scan = random_scan_inputs(2, (3, 5), 8, generator=gen)
    scan = {k: v.detach().to(device).requires_grad_() for k, v in scan.items() if torch.is_tensor(v)}
    bc = torch.cat([scan['B'], scan['C']], -1).detach().requires_grad_()
    scan_args = (scan['u'], scan['delta'], scan['A_logs'], bc[..., :4], bc[..., 4:], scan['D'], scan['delta_bias'])
    with torch.no_grad():
        _, states = selective_scan_fwd(*scan_args, 3, 5, list(AUTO_TILING), True)
    dy = draw(2, 15, 8)
    wide = draw(1, 4, 5, 16, grad=True)
    conv_w, conv_b = draw(8, 1, 3, 3, grad=True), draw(8)
    y, z, x = (draw(2, 3, 4, 16, grad=True) for _ in range(3))
    w, b = draw(16, grad=True), draw(16, grad=True)
    w12, b12 = draw(12, grad=True), draw(12, grad=True)
    scale = draw(2, 16, grad=True, rand=True)
    keep = torch.tensor([0.0, 1.25], device=device)  # stochastic depth's per-image scales: one image dropped
    with torch.no_grad():
        _, mean, rstd = gated_group_norm_fwd(y, z, w, b, 4, 1e-5, torch.float32, y.shape[-1])
        _, mmean, mrstd = modulated_layer_norm_fwd(y, x, scale, w, b, 1e-5)
        _, pmean, prstd = gated_group_norm_fwd(y, z, w12, b12, 4, 1e-5, torch.float32, 16)
        total, _, rmean, rrstd = residual_layer_norm_fwd(x, y, keep, w, b, 1e-6, torch.float32, 16)
    dout = draw(2, 3, 4, 16)
    # The channel affinity of 16 channels through 3 hidden units (no power of 2), of a map in bf16 as under
    # autocast, and the backward's inputs: its pooled map and its positions.
    affinity_map = draw(2, 3, 4, 16).bfloat16().requires_grad_()
    pooled = affinity_map.detach().mean((1, 2))
    affinity_params = (draw(3, 16, grad=True), draw(3, grad=True), draw(16, 3, grad=True), draw(16, grad=True),
                       draw(1, grad=True, rand=True))
    # ... and of 12 channels, their map stored as 16 (kernels/layout.py).
    affinity12 = (draw(3, 12, grad=True), draw(3, grad=True), draw(12, 3, grad=True), draw(12, grad=True),
                  draw(1, grad=True, rand=True))
    return [
        (selective_scan_fwd, (*scan_args, 3, 5, list(AUTO_TILING), True)),
        (selective_scan_bwd, (dy, *scan_args, states, 3, 5, list(AUTO_TILING))),
        (dwconv_act_forward, (wide[..., :8], conv_w, conv_b, 'silu')),
        (dwconv_act_bwd, (draw(1, 4, 5, 8), wide[..., :8], conv_w, conv_b, 'gelu', True)),
        (gated_group_norm_fwd, (y, z, w, b, 4, 1e-5, torch.float32, 16)),
        (gated_group_norm_fwd, (x, None, w, b, 1, 1e-6, torch.float32, 16)),
        # Padded maps (kernels/layout.py): 12 channels stored as 16, read padded or compact, written either way.
        (gated_group_norm_fwd, (y, z, w12, b12, 4, 1e-5, torch.float32, 16)),
        (gated_group_norm_fwd, (x[..., :12], None, w12, b12, 1, 1e-6, torch.float32, 16)),
        (gated_group_norm_fwd, (x, None, w12, b12, 1, 1e-6, torch.float32, 12)),
        (gated_group_norm_bwd, (dout, y, z, w12, b12, pmean, prstd, 4, 1e-5, torch.float32, True)),
        (modulated_layer_norm_fwd, (y, x, scale[:, :12], w12, b12, 1e-5)),
        (gated_group_norm_bwd, (dout, y, z, w, b, mean, rstd, 4, 1e-5, torch.float32, True)),
        (modulated_layer_norm_fwd, (y, x, scale, w, b, 1e-5)),
        (modulated_layer_norm_bwd, (dout, y, x, scale, w, b, mmean, mrstd, 1e-5, False)),
        # The residual add before a LayerNorm: with stochastic depth's scales or without, read padded (12 channels
        # in 16) and written compact, with the sum's gradient from other readers or without, the branch in bf16.
        (residual_layer_norm_fwd, (x, y, keep, w, b, 1e-6, torch.float32, 16)),
        (residual_layer_norm_fwd, (x, y, None, w, b, 1e-6, torch.float16, 16)),
        (residual_layer_norm_fwd, (x, y.bfloat16(), keep, w12, b12, 1e-6, torch.float32, 12)),
        (residual_layer_norm_bwd, (dout, draw(2, 3, 4, 16), total, keep, w, b, rmean, rrstd, 1e-6, torch.float32,
                                   torch.bfloat16, True)),
        (residual_layer_norm_bwd, (dout, None, total, None, w, b, rmean, rrstd, 1e-6, torch.float32, torch.float32,
                                   False)),
        (channel_affinity_fwd, (affinity_map, *affinity_params)),
        (channel_affinity_bwd, (draw(2, 16), pooled, *affinity_params, 12)),
        (channel_affinity_fwd, (affinity_map, *affinity12)),
        (channel_affinity_bwd, (draw(2, 12), pooled, *affinity12, 12)),
    ]


BACKWARD_OPS = (selective_scan_bwd, dwconv_act_bwd, gated_group_norm_bwd, modulated_layer_norm_bwd,
                residual_layer_norm_bwd, channel_affinity_bwd)


def opcheck_every_op(gen, device='cpu'):
    for op, args in op_samples(gen, device):
        if op in BACKWARD_OPS:  # not differentiable themselves (no double backward)
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(op.op, args)

"""FLOPs and parameters of GroupMamba models with mmengine's analysis, counting the selective scan.

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` traces the model with ``torch.jit`` and counts the ops it
has handles for (linear, conv, matmul, norms, ...); element-wise ops count zero. Two things about the GroupMamba
layer need care, and :func:`scan_counting` handles both while the analysis runs:

* The layer runs its four channel groups as block-diagonal linear layers and folds ``dt_proj`` into
  ``x_proj``. Counted as traced, those dense products would report FLOPs of zeros. While counting, every
  :class:`GroupMambaLayer` instead runs :func:`groupwise_forward`, the same function computed group by group
  as the official model does (checked equal to the layer in the tests).
* The scan, traced as the ops of its PyTorch reference, would be counted by its implementation's matmuls.
  While counting it runs as one ``torch.autograd.Function`` (:class:`CountedSelectiveScan`), which the trace
  records as a single ``prim::PythonOp`` node, counted by :func:`selective_scan_flop_jit` with the formula of
  the official FLOPs counter (Mamba's): ``9 * B * L * D * N + B * D * L`` (``N = d_state = 1``; the ``+``
  term is the ``D`` skip).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape

from mmgroupmamba.kernels import selective_scan
from mmgroupmamba.kernels.layout import unpad_groups
from mmgroupmamba.models.groupmamba import NUM_GROUPS, ConvFFN, GroupMambaLayer

D_STATE = 1


class CountedSelectiveScan(torch.autograd.Function):
    """:func:`mmgroupmamba.kernels.selective_scan` as one traced node (forward only: used for counting)."""

    @staticmethod
    def forward(ctx, u, delta, A_logs, B, C, D, delta_bias, height, width):
        # The trace records this Function as one node; the scan's own ops must not be traced into it (the
        # tracer fails on them inside a Function with "unordered_map::at"), so tracing pauses here.
        tracing_state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return selective_scan(u, delta, A_logs, B, C, D, delta_bias, (height, width))
        finally:
            torch._C._set_tracing_state(tracing_state)


def selective_scan_flop_jit(inputs, outputs):
    """FLOPs handle of :class:`CountedSelectiveScan`: ``u`` is ``(batch, length, channels)``."""
    batch, length, channels = get_shape(inputs[0])
    return 9 * batch * length * channels * D_STATE + batch * channels * length


SCAN_OP_NAME = f'prim::PythonOp.{CountedSelectiveScan.__name__}'


def groupwise_forward(layer, x, weights=None, normalized=False):
    """:class:`GroupMambaLayer` forward computed group by group with the official per-group ops (each group's
    weights a slice of the packed parameters), so that FLOPs are counted as the official model spends them.
    ``weights`` (what the block passes: its weights in the compute dtype) goes unused: FLOPs are counted in fp32
    on the parameters themselves. A padded layer's map (``kernels/layout.py``) is unpadded first and its
    output padded again (zeros: no FLOPs). ``normalized``: as the layer's (the block ran the input norm)."""
    x = unpad_groups(x, layer.Ds.numel())
    batch, height, width, dims = x.shape
    d = dims // NUM_GROUPS
    if not normalized:
        x = layer.norm(x)
    affinity = torch.sigmoid(layer.fc2(F.relu(layer.fc1(x.mean((1, 2))))))
    conv, norm = layer.conv2d, layer.out_norm
    scan_inputs, gates = [], []
    for g, x_group in enumerate(x.chunk(NUM_GROUPS, dim=-1)):
        channels = slice(g * d, (g + 1) * d)
        u, z = F.linear(x_group, layer.in_proj_weight[g]).chunk(2, dim=-1)
        u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), conv.weight[channels], conv.bias[channels], padding=1, groups=d))
        u = u.flatten(2).transpose(1, 2)  # (B, L, d)
        dt_low, b, c = F.linear(u, layer.x_proj_weight[g]).split([layer.dt_rank, D_STATE, D_STATE], dim=-1)
        delta = F.linear(dt_low, layer.dt_projs_weight[g])
        scan_inputs.append((u, delta, b, c, layer.A_logs[channels, 0].float(), layer.Ds[channels],
                            layer.dt_projs_bias[g]))
        gates.append(F.silu(z))
    u, delta, b, c, A_logs, D, delta_bias = (torch.cat(parts, dim=-1) for parts in zip(*scan_inputs))
    y = CountedSelectiveScan.apply(u, delta, A_logs, b, c, D, delta_bias, height, width)
    outs = []
    for g, (y_group, gate) in enumerate(zip(y.chunk(NUM_GROUPS, dim=-1), gates)):
        channels = slice(g * d, (g + 1) * d)
        normed = F.layer_norm(y_group, (d,), norm.weight[channels], norm.bias[channels], norm.eps)
        outs.append(F.linear(normed.view(batch, height, width, -1) * gate, layer.out_proj_weight[g]))
    y = torch.cat(outs, dim=-1) * (layer.skip_scale * x) * affinity[:, None, None, :]
    return layer.pad(layer.proj(layer.norm(y)))


def plain_ffn_forward(ffn, x, norm, weights=None, residual=None):
    """:class:`ConvFFN` forward with plain ops (the fused op + linear pairs are single opaque nodes to a trace);
    ``weights`` unused, as in :func:`groupwise_forward`; the pending residual added as a plain add (in evaluation,
    where nothing drops)."""
    if residual is not None:
        x = x + residual[0]
    conv = ffn.dwconv.dwconv
    h = ffn.fc1(norm(unpad_groups(x, ffn.fc2.out_features))).permute(0, 3, 1, 2)
    return x, ffn.pad(ffn.fc2(F.gelu(conv(h)).permute(0, 2, 3, 1)))


@contextmanager
def scan_counting(model):
    """Run every GroupMambaLayer of ``model`` through :func:`groupwise_forward` and every ConvFFN through
    :func:`plain_ffn_forward` inside the block."""
    replaced = [(m, groupwise_forward) for m in model.modules() if isinstance(m, GroupMambaLayer)]
    replaced += [(m, plain_ffn_forward) for m in model.modules() if isinstance(m, ConvFFN)]
    for module, forward in replaced:
        module.forward = forward.__get__(module)
    try:
        yield
    finally:
        for module, _ in replaced:
            del module.forward


def model_complexity(model, input_shape=(3, 224, 224)):
    """FLOPs (multiply-adds, as mmengine and the paper count) and parameters of ``model`` on one image.

    Returns a dict with ``flops``, ``params`` and ``flops_by_operator`` (a Counter).
    """
    model = model.eval()
    inputs = torch.randn(1, *input_shape)
    # The trace takes the model's state_dict() tensors as its inputs, and GroupMamba's state_dict() gives the
    # official per-group views of its packed parameters: the packed parameters themselves enter the trace as
    # constants, which the tracer refuses while they require grad.
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with scan_counting(model), torch.no_grad():
            analyzer = FlopAnalyzer(model, (inputs, ))
            analyzer.set_op_handle(SCAN_OP_NAME, selective_scan_flop_jit)
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            flops = analyzer.total()
            by_operator = analyzer.by_operator()
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return dict(flops=flops, params=parameter_count(model)[''], flops_by_operator=by_operator)


def config_complexity(config_path, input_shape=(3, 224, 224)):
    """:func:`model_complexity` of the model of an mmpretrain config (its teacher is never built)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    cfg = Config.fromfile(config_path)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    return model_complexity(MODELS.build(cfg.model), input_shape)

"""``benchmarks/host_time_by_node.py`` attributes an eager step's host time to every autograd node and module it
ran (timed on a GPU; checked here on the CPU, at a tiny size)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from backbone_speed import build_backbones  # noqa: E402
from host_time_by_node import graph_nodes, host_times  # noqa: E402


def test_every_node_and_block_of_the_step_is_timed():
    backbone = build_backbones(['T'], [''], 0.2)['GroupMamba-T'][0]
    images = torch.randn(2, 3, 32, 32)
    forward, backward, plain, recorded = host_times(backbone, images, torch.device('cpu'))
    assert forward['GroupMambaBlock'][0] == sum(backbone.arch['depths']) == 19
    assert forward['GroupMambaLayer'][0] == forward['ConvFFN'][0] == 19
    # One step's graph, each node once: one AccumulateGrad per trainable parameter among them.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = sum(o.float().mean() for o in backbone(images))
    assert sum(calls for calls, _ in backward.values()) == len(graph_nodes(loss.grad_fn))
    assert backward['torch::autograd::AccumulateGrad'][0] == sum(p.requires_grad for p in backbone.parameters())
    # The gated norm before out_proj; the FFN's norm adds the layer's residual branch in its pass.
    assert backward['GatedNormLinearFnBackward'][0] == backward['ResidualNormLinearFnBackward'][0] == 19
    assert all(seconds > 0 for _, seconds in backward.values())
    assert min(*plain, *recorded) > 0

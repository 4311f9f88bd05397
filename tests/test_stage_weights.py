"""A training step builds the blocks' weights once per stage (``stage_forward_weights``): one cast and one
block-diagonal build for all of a stage's blocks, the same tensors and gradients as each block's own."""
import pytest
import torch

from mmgroupmamba.kernels import layout
from mmgroupmamba.models import groupmamba
from mmgroupmamba.models.groupmamba import GroupMamba, stage_forward_weights


def flat(weights):
    return [t for part in weights for t in part]


@pytest.mark.parametrize('stage', [1, 2], ids=['unpadded', 'padded'])  # tiny: 128 channels, then 348 stored as 352
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_a_stage_builds_what_each_block_builds(stage, dtype):
    torch.manual_seed(0)
    blocks = getattr(GroupMamba(arch='tiny'), f'block{stage + 1}')
    assert len(blocks) > 1 and (blocks[0].stored_parameters is not None) == (stage == 2)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        together = [flat(w) for w in stage_forward_weights(blocks, dtype)]
        own = [flat(b._forward_weights(dtype)) for b in blocks]
    probes = [[torch.randn_like(t, dtype=torch.float32) for t in ts] for ts in own]
    grads = []
    for weights in (together, own):
        loss = sum((t.float() * p).sum() for ts, ps in zip(weights, probes) for t, p in zip(ts, ps))
        params = [p for b in blocks for p in b.weight_params()]
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for ours, theirs in zip(together, own):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ours, theirs))
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def test_a_training_step_builds_projections_once_per_stage(monkeypatch):
    builds, gathers = [], []
    apply = groupmamba._BlockDiagonalProjections.apply
    monkeypatch.setattr(groupmamba._BlockDiagonalProjections, 'apply',
                        lambda *weights: builds.append(weights[0].shape[0]) or apply(*weights))
    gather = layout._GatherStored.apply
    monkeypatch.setattr(layout._GatherStored, 'apply', lambda *args: gathers.append(len(args)) or gather(*args))
    model = GroupMamba(arch='tiny', drop_path_rate=0.1).train()
    image = torch.randn(1, 3, 64, 64)
    sum(out.sum() for out in model(image)).backward()
    assert builds == list(model.arch['depths']), builds  # one build a stage, of all its blocks
    per_block = len(model.block3[0].weight_params())
    assert gathers == [6 + model.arch['depths'][2] * per_block]  # stage 3, padded: one gather, all its blocks
    builds.clear()
    gathers.clear()
    with torch.no_grad():
        model.eval()(image)
    assert builds == [1] * sum(model.arch['depths'])  # no gradient: each block builds, then keeps, its own
    assert len(gathers) == model.arch['depths'][2]


def test_no_gradient_leaves_each_block_its_own():
    blocks = GroupMamba(arch='mini').block3
    with torch.no_grad():
        assert stage_forward_weights(blocks, torch.float32) == [None, None]
    for p in blocks.parameters():
        p.requires_grad_(False)
    assert stage_forward_weights(blocks, torch.float32) == [None, None]

"""Where no gradient reaches a block's matmul weights (inference, frozen stages), their casts and block-diagonal
projections are kept between eager calls (``GroupMambaBlock._forward_weights``): fewer launches, the same results,
and never stale."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from mmgroupmamba.models.groupmamba import GroupMamba, GroupMambaBlock
from op_counter import OpCounter


def block_and_input(seed=0):
    torch.manual_seed(seed)
    block = GroupMambaBlock(32, 2, drop_path=0.1).eval()
    return block, torch.randn(2, 6, 5, 32)


def fresh(block, x):
    """The block's output computed without any kept weights."""
    other = copy.deepcopy(block)
    other._constant_weights = None
    with torch.no_grad():
        return other(x)


def test_inference_keeps_the_weights_and_skips_their_launches():
    block, x = block_and_input()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        with OpCounter() as first:
            out1 = block(x)
        with OpCounter() as second:
            out2 = block(x)
    assert torch.equal(out1, out2)
    skipped = [op for op in ('new_zeros', 'bmm', 'cat', '_to_copy') if op in first.ops and op not in second.ops]
    assert skipped == ['new_zeros', 'bmm', 'cat', '_to_copy'], (first.ops, second.ops)
    assert len(first.ops) - len(second.ops) >= 7


def test_kept_weights_follow_in_place_updates_moves_and_casts():
    block, x = block_and_input()
    with torch.no_grad():
        block(x)
        block.attn.in_proj_weight.mul_(2)  # an optimizer-like in-place update: the version counter moves
        assert torch.equal(block(x), fresh(block, x))
        block.mlp.fc1.weight.copy_(torch.randn_like(block.mlp.fc1.weight))  # load_state_dict writes this way
        assert torch.equal(block(x), fresh(block, x))
        block.double()  # new storages and dtype
        x64 = x.double()
        assert torch.equal(block(x64), fresh(block, x64))


def test_a_write_through_data_is_seen_after_a_mode_switch():
    block, x = block_and_input()
    with torch.no_grad():
        block(x)
        block.attn.out_proj_weight.data.copy_(torch.randn_like(block.attn.out_proj_weight))  # no version change
        block.eval()  # as evaluation loops do after EMA hooks swap weights through .data
        assert torch.equal(block(x), fresh(block, x))


def test_training_builds_the_weights_every_step_and_keeps_none():
    block, x = block_and_input()
    block.train()
    out = block(x)
    out.sum().backward()
    assert block._constant_weights is None
    assert block.attn.in_proj_weight.grad is not None and block.mlp.fc1.weight.grad is not None


def test_backbone_inference_matches_a_fresh_model_after_training_steps():
    torch.manual_seed(0)
    model = GroupMamba(arch='mini')
    images = torch.randn(1, 3, 64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            got = model(images)
        expected = copy.deepcopy(model)
        for block in expected.modules():
            if isinstance(block, GroupMambaBlock):
                block._constant_weights = None
        with torch.no_grad():
            want = expected(images)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        model.train()
        sum(o.mean() for o in model(images)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_later_inference_forwards_launch_seven_kernels_fewer_a_block(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('MMGM_KERNELS', 'triton')  # launch_count sets it at import: put back for the other tests
        from launch_count import count_inference
    monkeypatch.setenv('MMGM_KERNELS', 'triton')  # the Triton path (interpreter), as on a GPU
    torch.manual_seed(0)
    model = GroupMamba(arch='mini')
    first, later = count_inference(model, torch.randn(1, 3, 64, 64), autocast=True)
    assert first - later == 7 * 5  # mini: 5 blocks


def test_nothing_is_kept_while_traced():
    from torch._subclasses.fake_tensor import FakeTensorMode
    block, x = block_and_input()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        block(torch.empty(2, 6, 5, 32))
    assert block._constant_weights is None
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        out = compiled(x)
    assert block._constant_weights is None
    assert torch.allclose(out, fresh(block, x), atol=1e-6)


def test_a_padded_block_keeps_its_pads_and_follows_its_per_channel_parameters():
    """A block stored padded (44 channels as 48, kernels/layout.py): inference keeps the padded per-channel
    parameters with the matmul weights (no gather into the stored layout in later forwards), and an in-place
    update of one of them (the scan's A_logs, the conv's bias) is seen."""
    torch.manual_seed(0)
    block = GroupMambaBlock(44, 2, drop_path=0.1, stored_dims=48).eval()
    x = torch.nn.functional.pad(torch.randn(2, 6, 5, 4, 11), (0, 1)).flatten(-2)  # zeros in the pad channels
    with torch.no_grad():
        with OpCounter() as first:
            out1 = block(x)
        with OpCounter() as second:
            out2 = block(x)
        assert torch.equal(out1, out2)
        assert 'index_select' in first.ops and 'index_select' not in second.ops, second.ops
        block.attn.A_logs.add_(0.5)
        assert torch.equal(block(x), fresh(block, x))
        block.attn.conv2d.bias.copy_(torch.randn_like(block.attn.conv2d.bias))
        assert torch.equal(block(x), fresh(block, x))
    assert not torch.equal(out1, block(x))

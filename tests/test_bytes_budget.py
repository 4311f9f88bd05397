"""``benchmarks/bytes_budget.py``: bytes read and written per launch, walked as ``benchmarks/launch_count.py``
counts launches. conftest.py sets TRITON_INTERPRET=1 before Triton is first imported."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
with pytest.MonkeyPatch.context() as patch:
    patch.setenv('MMGM_KERNELS', 'triton')  # launch_count sets it at import: put back for the other tests
    from bytes_budget import ByteBudget, budget_block, bytes_of, parse_measured, step_bytes
    from launch_count import count_step

from mmgroupmamba.models.groupmamba import GroupMambaBlock  # noqa: E402


def test_a_plain_add_reads_its_inputs_and_writes_its_output():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    row = torch.randn(1, 8)
    budget = ByteBudget()
    with budget:
        torch.add(a, b)
        torch.add(a, row.expand(4, 8))  # a broadcast operand's elements count once
        out = torch.empty(4, 8)  # an allocation moves nothing
        out.copy_(a)  # copy_ overwrites its destination without reading it
    assert budget.launches == {('forward', 'add'): 2, ('forward', 'copy_'): 1}
    assert budget.read['forward', 'add'] == 2 * a.nbytes + a.nbytes + row.nbytes
    assert budget.written['forward', 'add'] == 2 * a.nbytes
    assert (budget.read['forward', 'copy_'], budget.written['forward', 'copy_']) == (a.nbytes, a.nbytes)
    assert bytes_of(a[:, :2]) == 4 * 2 * 4  # a column slice: its own elements, not the rows' span


def test_block_budget_matches_the_launch_count_and_exceeds_the_minimum(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    budget, minimum = budget_block(32, 4, 8)

    torch.manual_seed(0)
    block = GroupMambaBlock(32, 4, drop_path=0.1).train()
    x = torch.randn(1, 8, 8, 32, requires_grad=True)
    assert budget.launches == count_step(block, x, autocast=True)

    for phase in ('forward', 'backward'):
        launches, read, written = budget.totals(phase)
        assert launches > 0 and read > 0 and written > 0
    kernels = [k for k in budget.launches if k[1].startswith('triton:')]
    assert kernels
    for key in kernels:  # each kernel is handed inputs, and outputs its launcher allocated for it
        assert budget.read[key] > 0 and budget.written[key] > 0, key

    least = sum(n for _, _, n in minimum)
    assert 0 < least <= sum(budget.totals()[1:])
    activations = [n for n, from_weights in budget.kept.values() if not from_weights]
    weight_casts = [n for n, from_weights in budget.kept.values() if from_weights]
    # The matmul weights' bf16 buffer (cast_together: a concatenation with unfilled padding, then a cast) is
    # told apart from what the block computed.
    matmul_weights = block.attn.matmul_params() + block.mlp.matmul_params()
    assert activations and max(weight_casts) >= sum(2 * p.numel() for p in matmul_weights)


def test_the_walk_without_the_kernels_gives_the_same_budget(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    walks = [budget_block(32, 4, 8, run_kernels=run) for run in (True, False)]
    (ran, ran_minimum), (skipped, skipped_minimum) = walks
    assert (ran.launches, ran.read, ran.written) == (skipped.launches, skipped.read, skipped.written)
    assert ran_minimum == skipped_minimum


def test_measured_kernel_times_parse_loudly():
    assert parse_measured(['_scan_bwd_kernel=6.157', '_dwconv_fwd_kernel=1']) == {'_scan_bwd_kernel': 6.157,
                                                                                 '_dwconv_fwd_kernel': 1.0}
    for bad in ('_scan_bwd_kernel', '_scan_bwd_kernel=fast', '=1.0'):
        with pytest.raises(SystemExit, match='KERNEL=MS'):
            parse_measured([bad])


def test_step_bytes_scale_a_blocks_bytes_by_batch_and_depth(monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    budget, _ = budget_block(32, 4, 8)
    ours = {}
    for phase, name in budget.launches:  # the conv's forward kernel runs in both phases: summed
        if name.startswith('triton:'):
            key = name[len('triton:'):]
            ours[key] = ours.get(key, 0) + budget.read[phase, name] + budget.written[phase, name]
    assert '_scan_fwd_kernel' in ours and '_dwconv_bwd_pre_kernel' in ours
    # Stage 2 of the tiny arch has 4 blocks; only our Triton kernels are counted.
    moved = step_bytes([(2, 32, 8, budget, 0, 0)], batch=16)
    assert moved == {name: n * 16 * 4 for name, n in ours.items()}


def test_inference_budget_walks_a_later_forward_only(monkeypatch):
    """``--inference``: the eval forward that reuses the block's built weights, as many launches as the launch count
    gives a later inference forward, every byte in the forward, against the block's input, weights and output."""
    from launch_count import count_inference

    monkeypatch.setenv('MMGM_KERNELS', 'triton')
    budget, minimum = budget_block(32, 4, 8, inference=True)
    assert budget.totals('backward') == (0, 0, 0)
    launches, read, written = budget.totals('forward')
    torch.manual_seed(0)
    block = GroupMambaBlock(32, 4, drop_path=0.1)
    first, later = count_inference(block, torch.randn(1, 8, 8, 32), autocast=True)
    assert launches == later < first
    assert [item for _, item, _ in minimum] == ['block input read', 'weights read', 'block output written']
    assert 0 < sum(n for _, _, n in minimum) < read + written

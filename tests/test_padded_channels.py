"""Stages stored with padded channels (``kernels/layout.py``): a stage whose width is not a multiple of 8 (348 in
T and S) carries each scan group's channels followed by zeros, so that cuBLAS runs its fast kernels. The padded
model must be the unpadded one: same parameters, same outputs and gradients, on both kernel implementations,
eagerly and compiled."""
import functools

import pytest
import torch

from mmgroupmamba import GroupMamba
from mmgroupmamba.kernels.layout import (
    StoredParameters,
    pad_blocks,
    pad_groups,
    stored_channels,
    unpad_groups,
)
from op_counter import OpCounter

# Stage widths 44, 60 and 36: scan groups of 11, 15 and 9 channels, stored as 12, 16 and 12 (48, 64 and 48 channels).
ODD_ARCH = dict(stem_hidden_dim=8, embed_dims=[32, 44, 60, 36], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 2, 1])


def close(a, b, tol):
    """``a`` within ``tol`` of ``b`` relative to b's norm (exact where b is zero: a dead ReLU's gradient)."""
    return (a.double() - b.double()).norm() <= tol * b.double().norm()


def test_stored_channels():
    assert [stored_channels(c) for c in (64, 128, 348, 448, 424, 96, 44, 60, 36)] == [
        64, 128, 352, 448, 432, 96, 48, 64, 48]
    assert [stored_channels(c, 8) for c in (348, 424, 36)] == [352, 424, 40]
    assert stored_channels(348, 1) == 348
    assert GroupMamba('tiny').stored_dims == [64, 128, 352, 448]
    assert GroupMamba('tiny', channel_multiple=1).stored_dims == [64, 128, 348, 448]
    with pytest.raises(ValueError, match='channel_multiple'):
        GroupMamba('mini', channel_multiple=0)


def test_pad_and_unpad_groups():
    t = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)
    padded = pad_groups(t, 16)
    assert padded.shape == (2, 16)
    assert torch.equal(padded.view(2, 4, 4)[..., 3], torch.zeros(2, 4))
    assert torch.equal(padded.view(2, 4, 4)[..., :3], t.view(2, 4, 3))
    assert torch.equal(unpad_groups(padded, 12), t)
    assert torch.equal(pad_groups(t.t(), 16, dim=0).t(), padded)
    assert pad_groups(t, 12) is t


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_stored_parameters_are_the_pads_in_one_gather_each_way(dtype):
    """StoredParameters lays parameters out as their own pads would (values and gradients, the cast ones cast),
    each stored tensor aligned, with one gather forward and one backward; a parameter given twice (cast and
    as it is, as the blocks' biases) gets both gradients, and one whose outputs get none gets None."""
    torch.manual_seed(0)
    square, matrix, bias, unused = (torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
                                    for shape in ((12, 12), (5, 3, 12), (12, ), (3, 9)))
    pads = [lambda t: pad_groups(pad_groups(t, 16, dim=0), 16, dim=1), functools.partial(pad_groups, stored=16),
            functools.partial(pad_groups, stored=16), lambda t: pad_blocks(t, 4, 12)]
    layouts = [(p.shape, pad) for p, pad in zip((square, matrix, bias, unused), pads)]
    stored = StoredParameters(layouts[:3], layouts[2:], align=8)
    with OpCounter() as forward_ops:
        [((square_s, matrix_s, bias_s), (bias_kept, unused_s))] = stored([([square, matrix, bias], [bias, unused])],
                                                                         dtype)
    expected = [pad(p.detach()) for p, pad in zip((square, matrix, bias, bias, unused), pads[:3] + pads[2:])]
    got = (square_s, matrix_s, bias_s, bias_kept, unused_s)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e.to(dtype if i < 3 else torch.float32)), i
    assert [t.dtype for t in got] == [dtype] * 3 + [torch.float32] * 2
    assert all(t.data_ptr() % (8 * t.element_size()) == 0 for t in got)
    assert forward_ops.ops.count('index_select') == 1

    weights = [torch.randn(t.shape) for t in got[:4]]
    with OpCounter() as backward_ops:
        sum((t.float() * w).sum() for t, w in zip(got[:4], weights)).backward()
    assert backward_ops.ops.count('index_select') == 1
    grads = [square.grad, matrix.grad, bias.grad]
    square.grad = matrix.grad = bias.grad = None
    plain = [pad(p).to(dtype if i < 3 else torch.float32)
             for i, (p, pad) in enumerate(zip((square, matrix, bias, bias), pads[:3] + [pads[2]]))]
    sum((t.float() * w).sum() for t, w in zip(plain, weights)).backward()
    for name, g, e in zip(('square', 'matrix', 'bias'), grads, (square.grad, matrix.grad, bias.grad)):
        assert torch.equal(g, e), name
    assert unused.grad is None


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_several_blocks_share_one_gather_and_get_what_each_gets_alone(dtype):
    """A stage's blocks (parameters of the same shapes) go through one gather each way: each block's stored
    tensors, and its parameters' gradients, as when it is gathered alone; one whose outputs get no gradient gets
    None."""
    torch.manual_seed(0)
    pads = [functools.partial(pad_groups, stored=16), lambda t: pad_blocks(t, 4, 12),
            functools.partial(pad_groups, stored=16)]
    shapes = ((5, 3, 12), (3, 9), (12, ))
    stored = StoredParameters([(s, pad) for s, pad in zip(shapes[:2], pads[:2])], [(shapes[2], pads[2])], align=8)
    blocks = [[torch.randn(s).requires_grad_() for s in shapes] for _ in range(3)]
    probes = [[torch.randn(pad(torch.zeros(s)).shape) for s, pad in zip(shapes, pads)] for _ in blocks]

    def gathered(groups):
        """The blocks gathered in calls of ``groups`` blocks: every stored tensor, and every parameter's
        gradient for a loss that reads all but the second block's first output."""
        outputs = []
        with OpCounter() as forward_ops:
            for i in range(0, len(blocks), groups):
                outputs += stored([(p[:2], p[2:]) for p in blocks[i:i + groups]], dtype)
        assert forward_ops.ops.count('index_select') == len(blocks) // groups
        flat = [t for cast, kept in outputs for t in cast + kept]
        loss = sum((t.float() * w).sum() for i, (t, w) in enumerate(zip(flat, [w for ws in probes for w in ws]))
                   if i != 3)
        grads = torch.autograd.grad(loss, [p for ps in blocks for p in ps], allow_unused=True)
        return flat, grads

    (alone, alone_grads), (together, together_grads) = gathered(1), gathered(3)
    for a, b in zip(alone, together):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert [t.dtype for t in together[:3]] == [dtype, dtype, torch.float32]
    assert together_grads[3] is None and all(g is not None for i, g in enumerate(together_grads) if i != 3)
    for a, b in zip(alone_grads, together_grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_a_stages_blocks_share_one_gather_index():
    """The gather's index depends on the shapes only: one per padded stage, not saved, moved with the model."""
    model = GroupMamba(ODD_ARCH)
    stage = model.block3
    assert stage[0].stored_parameters is not None and stage[1].stored_parameters is stage[0].stored_parameters
    assert model.block1[0].stored_parameters is None  # 32 channels: not padded
    assert not any('stored_parameters' in k for k in model.state_dict())
    index = stage[0].stored_parameters.index
    model.double()
    assert stage[1].stored_parameters.index.dtype == index.dtype == torch.int32


def twin_models(**kwargs):
    torch.manual_seed(0)
    plain = GroupMamba(ODD_ARCH, channel_multiple=1, **kwargs)
    padded = GroupMamba(ODD_ARCH, **kwargs)
    padded.load_state_dict(plain.state_dict())
    assert padded.stored_dims == [32, 48, 64, 48]
    return plain, padded


def outputs_and_grads(model, x, autocast_dtype=None):
    model.zero_grad()
    with torch.autocast('cpu', dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        outs = model(x)
    gen = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    return [o.detach().float() for o in outs], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_padded_model_is_the_unpadded_one(impl, monkeypatch):
    """Outputs and every parameter's gradient in training mode, fp32, on both implementations (Triton through
    the interpreter)."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    plain, padded = twin_models()
    x = torch.randn(1, 3, 24, 40) if impl == 'triton' else torch.randn(2, 3, 40, 56)
    (outs_a, grads_a), (outs_b, grads_b) = (outputs_and_grads(m.train(), x) for m in (plain, padded))
    for a, b in zip(outs_a, outs_b):
        assert a.shape == b.shape and close(b, a, 1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].shape == grads_b[name].shape, name
        assert close(grads_b[name], grads_a[name], 1e-5), name


@pytest.mark.parametrize('options', [dict(out_type='cls_token'), dict(with_cp=True), dict(frozen_stages=2)])
def test_padded_model_with_options(options):
    """The class token (the last stage, 36 channels as 40, unpadded before the class block), gradient
    checkpointing and frozen stages on the padded model (reference path, fp32). The class block's skip_scale
    gradient sums its one token's channels with much cancellation: 1e-3."""
    plain, padded = twin_models(**options)
    x = torch.randn(2, 3, 40, 56)
    (outs_a, grads_a), (outs_b, grads_b) = (outputs_and_grads(m.train(), x) for m in (plain, padded))
    for a, b in zip(outs_a, outs_b):
        assert a.shape == b.shape and close(b, a, 1e-6)
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            assert close(grads_b[name], grads_a[name], 1e-3), name


def test_padded_model_under_autocast():
    plain, padded = twin_models()
    x = torch.randn(2, 3, 40, 56)
    (outs_a, grads_a), (outs_b, grads_b) = (outputs_and_grads(m.train(), x, torch.bfloat16) for m in (plain, padded))
    for a, b in zip(outs_a, outs_b):
        assert close(b, a, 1e-2)
    for name in grads_a:
        assert close(grads_b[name], grads_a[name], 3e-2), name


def test_pad_channels_hold_zeros_and_state_dict_is_official():
    """Every block of a padded stage outputs exact zeros in its pad channels (its map, and the FFN branch still to
    be added to it: a stage leaves that add to the next norm); the state dict's keys and shapes are the unpadded
    model's (the official ones)."""
    _, padded = twin_models()
    block_outputs = []
    for stage in (2, 3):
        for block in getattr(padded, f'block{stage}'):
            block.register_forward_hook(lambda module, args, out, stage=stage: block_outputs.append((stage, out)))
    with torch.no_grad():
        padded(torch.randn(2, 3, 40, 56))
    assert len(block_outputs) == 3
    for stage, (out, (branch, _)) in block_outputs:
        valid, stored = ODD_ARCH['embed_dims'][stage - 1], padded.stored_dims[stage - 1]
        for t in (out, branch):
            assert t.shape[-1] == stored
            pads = t[..., pad_groups(torch.ones(valid), stored) == 0]
            assert pads.numel() and torch.equal(pads, torch.zeros_like(pads))
    plain = GroupMamba(ODD_ARCH, channel_multiple=1)
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_padded_model_compiles_in_one_graph(monkeypatch):
    """fullgraph=True with symbolic sizes (aot_eager on the CPU, as tests/test_compile.py): eager's results."""
    torch._dynamo.reset()
    try:
        _, padded = twin_models()
        compiled = GroupMamba(ODD_ARCH, compile=dict(backend='aot_eager'))
        compiled.load_state_dict(padded.state_dict())
        x = torch.randn(2, 3, 40, 56)
        (outs_a, grads_a), (outs_b, grads_b) = (outputs_and_grads(m.train(), x) for m in (padded, compiled))
        for a, b in zip(outs_a, outs_b):
            assert close(b, a, 1e-6)
        for name in grads_a:
            assert close(grads_b[name], grads_a[name], 1e-5), name
    finally:
        torch._dynamo.reset()


class MatmulShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ``(rows, K, N)`` of every 2-D matmul (mm, addmm) run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


def test_tiny_runs_every_map_matmul_with_k_and_n_multiples_of_8():
    """GroupMamba-T's stage 3 (348 channels): every matmul over a map (more than one row: not the channel
    affinity's, on one pooled vector) has K and N multiples of 8, forward and backward (the weight gradients'
    K, the positions, too at this size); unpadded, some do not."""
    x = torch.randn(1, 3, 128, 128)
    for multiple, aligned in ((8, True), (1, False)):
        model = GroupMamba('tiny', channel_multiple=multiple).train()
        with MatmulShapes() as mode:
            sum(o.sum() for o in model(x)).backward()
        map_matmuls = [s for s in mode.shapes if s[0] > 1 and max(s) > 8]
        assert map_matmuls
        assert all(k % 8 == 0 and n % 8 == 0 for _, k, n in map_matmuls) == aligned, sorted(set(map_matmuls))

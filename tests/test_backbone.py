import copy
from pathlib import Path

import pytest
import torch
from mmengine.registry import MODELS, DefaultScope

from log_capture import mmengine_messages
from mmgroupmamba import GroupMamba
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden'
SMALL_ARCH = ARCH_SETTINGS['mini']
CLASSIFICATION_PREFIXES = ('post_network.', 'head.', 'dist_head.')


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN / 'golden_mini_seed0.pt', weights_only=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def official_shapes(size):
    rows = (GOLDEN / f'official_state_dict_{size}.tsv').read_text().splitlines()[1:]
    return {k: tuple(int(d) for d in s.strip('()').split(',') if d.strip()) for k, s in (r.split('\t') for r in rows)}


def test_reproduces_golden_official_outputs(golden):
    model = GroupMamba(arch=golden['arch_cfg'], out_indices=(0, 1, 2, 3))
    result = model.load_state_dict(golden['state_dict'], strict=False)
    assert result.missing_keys == []
    assert all(k.startswith(CLASSIFICATION_PREFIXES) for k in result.unexpected_keys)
    model.eval()
    with torch.no_grad():
        outs = model(golden['input'])
    assert len(outs) == 4
    for out, expected in zip(outs, golden['stage_outputs']):
        assert out.shape == expected.shape
        assert rel_err(out, expected) <= 1e-4


@pytest.mark.parametrize('size, expected', [('tiny', 20_462_224), ('small', 31_143_298), ('base', 53_512_581)])
def test_parameter_counts_and_official_keys(size, expected):
    model = GroupMamba(arch=size)
    assert sum(p.numel() for p in model.parameters()) == expected
    official = {k: v for k, v in official_shapes(size).items() if not k.startswith(CLASSIFICATION_PREFIXES)}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_cls_token_adds_exactly_the_official_post_network(size):
    model = GroupMamba(arch=size, out_type='cls_token')
    official = {k: v for k, v in official_shapes(size).items() if not k.startswith(('head.', 'dist_head.'))}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official
    # The other out_types are the detection/segmentation backbone: no class-token parameters.
    for out_type in ('featmap', 'avg_featmap'):
        keys = GroupMamba(arch=size, out_type=out_type).state_dict().keys()
        assert not any(k.startswith('post_network.') for k in keys)


def test_out_types_shapes_and_pooling():
    torch.manual_seed(0)
    featmap = GroupMamba(arch=SMALL_ARCH).eval()
    avg = GroupMamba(arch=SMALL_ARCH, out_type='avg_featmap', out_indices=(1, 3)).eval()
    avg.load_state_dict(featmap.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = featmap(x)
        pooled = avg(x)
        last_pooled = GroupMamba(arch=SMALL_ARCH, out_type='avg_featmap').eval()(x)
        token = GroupMamba(arch=SMALL_ARCH, out_type='cls_token').eval()(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 96, 4, 6), (2, 128, 2, 3)]
    assert [tuple(p.shape) for p in pooled] == [(2, 64), (2, 128)]
    for p, m in zip(pooled, (maps[1], maps[3])):
        torch.testing.assert_close(p, m.mean((2, 3)))
    assert len(last_pooled) == 1 and last_pooled[0].shape == (2, 128)  # the last stage by default, as ViT
    assert len(token) == 1 and token[0].shape == (2, 128)


def test_cls_token_gives_the_official_head_logits(golden):
    model = GroupMamba(arch=golden['arch_cfg'], out_type='cls_token')
    result = model.load_state_dict(golden['state_dict'], strict=False)
    assert result.missing_keys == []
    assert all(k.startswith(('head.', 'dist_head.')) for k in result.unexpected_keys)
    model.eval()
    with torch.no_grad():
        (token, ) = model(golden['input'])
    state = golden['state_dict']
    logits = torch.nn.functional.linear(token, state['head.weight'], state['head.bias'])
    assert (logits - golden['head']).abs().max() <= 1e-4 * golden['logits'].abs().max()


def test_out_type_errors_name_the_key_and_choices():
    with pytest.raises(ValueError, match=r"unknown out_type 'cls'; choose one of \('featmap', 'avg_featmap', "
                                         r"'cls_token'\)"):
        GroupMamba(arch=SMALL_ARCH, out_type='cls')
    with pytest.raises(ValueError, match=r"out_type='cls_token'.*out_indices must be \(3,\).*got \(2, 3\)"):
        GroupMamba(arch=SMALL_ARCH, out_type='cls_token', out_indices=(2, 3))


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain', None])
def test_registry_builds_in_every_scope(scope):
    cfg = dict(type='GroupMamba', arch=SMALL_ARCH, out_indices=(1, 3))
    if scope is None:
        model = MODELS.build(cfg)
    else:
        registry = {'mmdet': 'mmdet.registry', 'mmseg': 'mmseg.registry',
                    'mmpretrain': 'mmpretrain.registry'}[scope]
        module = __import__(registry, fromlist=['MODELS'])
        with DefaultScope.overwrite_default_scope(scope):
            model = module.MODELS.build(cfg)
    assert isinstance(model, GroupMamba) and model.out_indices == (1, 3)


@pytest.mark.parametrize('hw', [(97, 133), (32, 32), (33, 65)])
def test_any_input_size_batch_one(hw):
    model = GroupMamba(arch=SMALL_ARCH)
    x = torch.randn(1, 3, *hw)
    expected = []
    h, w = hw
    for _ in range(2):  # conv stem: two stride-2 convs
        h, w = (h + 1) // 2, (w + 1) // 2
    for dims in SMALL_ARCH['embed_dims']:
        expected.append((1, dims, h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    for mode in ('train', 'eval'):
        getattr(model, mode)()
        outs = model(x)
        assert [tuple(o.shape) for o in outs] == expected
        assert all(torch.isfinite(o).all() for o in outs)


def test_frozen_stages_have_no_grad():
    model = GroupMamba(arch=SMALL_ARCH, frozen_stages=2)
    model.train()
    for name, param in model.named_parameters():
        frozen = name.startswith(('patch_embed1.', 'block1.', 'norm1.', 'patch_embed2.', 'block2.', 'norm2.'))
        assert param.requires_grad != frozen, name
    assert not model.patch_embed1.training and not model.block2.training and model.block3.training
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith('block1.'))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith('block3.'))


def test_norm_eval_keeps_batchnorm_in_eval():
    model = GroupMamba(arch=SMALL_ARCH, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_with_cp_gives_same_gradients():
    torch.manual_seed(0)
    plain = GroupMamba(arch=SMALL_ARCH, drop_path_rate=0.0)
    ckpt = copy.deepcopy(plain)
    for block in ckpt.modules():
        if hasattr(block, 'with_cp'):
            block.with_cp = True
    x = torch.randn(2, 3, 48, 80)
    grads = []
    for model in (plain, ckpt):
        model.train()
        sum((o * o).mean() for o in model(x)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_with_cp_argument_reaches_blocks():
    model = GroupMamba(arch=SMALL_ARCH, with_cp=True)
    assert all(block.with_cp for block in model.block3)


def test_arch_errors_name_the_bad_key():
    with pytest.raises(KeyError, match='huge'):
        GroupMamba(arch='huge')
    with pytest.raises(KeyError, match='depths'):
        GroupMamba(arch={k: v for k, v in SMALL_ARCH.items() if k != 'depths'})
    with pytest.raises(ValueError, match='embed_dims'):
        GroupMamba(arch=dict(SMALL_ARCH, embed_dims=[30, 64, 96, 128]))
    with pytest.raises(ValueError, match='out_indices'):
        GroupMamba(arch=SMALL_ARCH, out_indices=(4,))
    assert set(ARCH_SETTINGS) == {'tiny', 'small', 'base', 'mini'}


@pytest.mark.parametrize('wrap', ['raw', 'model', 'state_dict', 'backbone_prefix'])
def test_pretrained_official_checkpoint_loads(golden, tmp_path, wrap):
    state = golden['state_dict']
    payload = {'raw': state, 'model': {'model': state, 'epoch': 3}, 'state_dict': {'state_dict': state},
               'backbone_prefix': {'state_dict': {f'backbone.{k}': v for k, v in state.items()}}}[wrap]
    path = tmp_path / 'official.pth'
    torch.save(payload, path)
    model = GroupMamba(arch=golden['arch_cfg'], init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with mmengine_messages() as messages:
        model.init_weights()
    report = [m for m in messages if 'classification keys' in m]
    assert len(report) == 1 and 'post_network.' in report[0]
    model.eval()
    with torch.no_grad():
        out = model(golden['input'])[3]
    assert rel_err(out, golden['stage_outputs'][3]) <= 1e-4


def test_pretrained_official_checkpoint_loads_the_class_block_for_cls_token(golden, tmp_path):
    path = tmp_path / 'official.pth'
    torch.save(golden['state_dict'], path)
    model = GroupMamba(arch=golden['arch_cfg'], out_type='cls_token',
                       init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with mmengine_messages() as messages:
        model.init_weights()
    report = [m for m in messages if 'classification keys' in m]
    assert len(report) == 1 and 'head.' in report[0] and 'post_network.' not in report[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, golden['state_dict'][key]), key


def test_pretrained_with_wrong_shape_fails_naming_the_key(golden, tmp_path):
    state = dict(golden['state_dict'])
    state['block2.0.attn.proj.weight'] = torch.zeros(3, 3)
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    model = GroupMamba(arch=golden['arch_cfg'], init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'block2\.0\.attn\.proj\.weight'):
        model.init_weights()
    # A tiny checkpoint for a small arch: shapes differ at the very first key.
    path = tmp_path / 'other_arch.pth'
    torch.save(golden['state_dict'], path)
    model = GroupMamba(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'patch_embed1\.conv\.0\.weight'):
        model.init_weights()


def test_pretrained_missing_keys_fail(golden, tmp_path):
    state = {k: v for k, v in golden['state_dict'].items() if not k.startswith('block4.')}
    path = tmp_path / 'partial.pth'
    torch.save(state, path)
    model = GroupMamba(arch=golden['arch_cfg'], init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(KeyError, match='missing'):
        model.init_weights()


@pytest.mark.parametrize('autocast', [False, True])
def test_ffn_recomputing_backward_matches_plain_autograd(autocast):
    from mmgroupmamba.models.groupmamba import ConvFFN
    F = torch.nn.functional
    torch.manual_seed(0)
    ffn = ConvFFN(16, 64)
    norm = torch.nn.LayerNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    grad_out = torch.randn(2, 5, 7, 16)
    params = [*norm.parameters(), *ffn.parameters()]

    def grads(fn):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        return [out.float(), *torch.autograd.grad(out, [x, *params], grad_out.to(out.dtype))]

    conv = ffn.dwconv.dwconv

    def plain_ffn(t):
        h = ffn.fc1(norm(t)).permute(0, 3, 1, 2)
        return ffn.fc2(F.gelu(F.conv2d(h, conv.weight, conv.bias, padding=1, groups=h.shape[1])).permute(0, 2, 3, 1))

    plain = grads(plain_ffn)
    fused = grads(lambda t: ffn(t, norm)[1])
    names = ['out', 'x', 'norm.weight', 'norm.bias'] + [n for n, _ in ffn.named_parameters()]
    for name, a, b in zip(names, fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tolerance = 2e-2 if autocast else 1e-6
        assert rel_err(a.float(), b.float()) <= tolerance, name


def per_group_layer(layer, x):
    """What the official layer computes, one channel group at a time, with plain autograd ops (each group's
    weights a view of the packed parameters, no block-diagonal weights): the oracle for GroupMambaLayer's
    forward and its gradients."""
    import torch.nn.functional as F

    from mmgroupmamba.kernels import selective_scan_reference
    batch, height, width, channels = x.shape
    d, rank = channels // 4, layer.dt_rank
    xn = F.layer_norm(x, (channels,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    us, zs, deltas, bs, cs = [], [], [], [], []
    conv = layer.conv2d
    for g in range(4):
        u, z = F.linear(xn[..., g * d:(g + 1) * d], layer.in_proj_weight[g]).chunk(2, dim=-1)
        u = F.conv2d(u.permute(0, 3, 1, 2), conv.weight[g * d:(g + 1) * d], conv.bias[g * d:(g + 1) * d], padding=1,
                     groups=d)
        u = F.silu(u).permute(0, 2, 3, 1).reshape(batch, -1, d)
        dt, b, c = (u @ layer.x_proj_weight[g].t()).split([rank, 1, 1], dim=-1)
        us.append(u), zs.append(z), deltas.append(dt @ layer.dt_projs_weight[g].t()), bs.append(b), cs.append(c)
    y = selective_scan_reference(
        torch.cat(us, -1), torch.cat(deltas, -1), layer.A_logs.flatten(), torch.cat(bs, -1),
        torch.cat(cs, -1), layer.Ds, layer.dt_projs_bias.flatten(), (height, width))
    y = y.view(batch, height, width, channels)
    norm = layer.out_norm
    outs = [F.linear(F.layer_norm(y[..., g * d:(g + 1) * d], (d,), norm.weight[g * d:(g + 1) * d],
                                  norm.bias[g * d:(g + 1) * d], norm.eps) * F.silu(zs[g]), layer.out_proj_weight[g])
            for g in range(4)]
    affinity = torch.sigmoid(layer.fc2(F.relu(layer.fc1(xn.mean((1, 2))))))
    y = torch.cat(outs, -1) * layer.skip_scale * xn * affinity[:, None, None, :]
    return layer.proj(F.layer_norm(y, (channels,), layer.norm.weight, layer.norm.bias, layer.norm.eps))


@pytest.mark.parametrize('autocast', [False, True])
def test_layer_matches_per_group_computation_and_gradients(autocast):
    """The packed parameters and block-diagonal weights give the per-group outputs and gradients."""
    from mmgroupmamba.models.groupmamba import GroupMambaLayer, init_official_weights
    torch.manual_seed(0)
    layer = GroupMambaLayer(48)
    layer.apply(init_official_weights)
    with torch.no_grad():  # non-trivial affines and skip scale, so their gradients are checked too
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 5, 6, 48, requires_grad=True)
    grad_out = torch.randn(2, 5, 6, 48)
    params = dict(layer.named_parameters())

    def grads(fn):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        return [out.float(), *torch.autograd.grad(out, [x, *params.values()], grad_out.to(out.dtype))]

    ours, oracle = grads(layer), grads(lambda t: per_group_layer(layer, t))
    tolerance = 3e-2 if autocast else 1e-5
    for name, a, b in zip(['out', 'x', *params], ours, oracle):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a.float(), b.float()) <= tolerance, (name, rel_err(a.float(), b.float()))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_projections_are_the_groups_blocks_on_the_diagonal(dtype):
    """Each group's blocks, in ``dtype``, exactly (the packed weights are laid out, not computed with)."""
    from mmgroupmamba.models.groupmamba import GroupMambaLayer
    torch.manual_seed(0)
    layer = GroupMambaLayer(48)
    d, rank = 12, layer.dt_rank
    in_w, out_w, x_w, dt_w = (p.detach().to(dtype) for p in (layer.in_proj_weight, layer.out_proj_weight,
                                                              layer.x_proj_weight, layer.dt_projs_weight))
    expected = (torch.cat([torch.block_diag(*in_w[:, :d]), torch.block_diag(*in_w[:, d:])]),
                torch.cat([torch.block_diag(*torch.bmm(dt_w, x_w[:, :rank])),  # delta's rows, then B's and C's
                           torch.block_diag(*x_w[:, rank:rank + 1]), torch.block_diag(*x_w[:, rank + 1:])]),
                torch.block_diag(*out_w))
    from mmgroupmamba.models.groupmamba import cast_together
    got = layer.projections(*cast_together(layer.matmul_params(), dtype)[:4])
    for name, got, want in zip(('in_proj', 'delta_bc_proj', 'out_proj'), got, expected):
        assert got.dtype == dtype and torch.equal(got, want), name


def test_projections_backward_reads_the_diagonal_blocks():
    """The hand-written backward of the block-diagonal projections gives autograd's gradients through plain ops
    (torch.block_diag), for every packed weight, and passes gradcheck (float64)."""
    from mmgroupmamba.models.groupmamba import GroupMambaLayer
    torch.manual_seed(0)
    layer = GroupMambaLayer(48).double()
    d, rank = 12, layer.dt_rank
    weights = [p.detach().clone().requires_grad_() for p in layer.matmul_params()[:4]]

    def plain(in_w, x_w, dt_w, out_w):
        return (torch.cat([torch.block_diag(*in_w[:, :d]), torch.block_diag(*in_w[:, d:])]),
                torch.cat([torch.block_diag(*torch.bmm(dt_w, x_w[:, :rank])),
                           torch.block_diag(*x_w[:, rank:rank + 1]), torch.block_diag(*x_w[:, rank + 1:])]),
                torch.block_diag(*out_w))

    ours = layer.projections(*weights)
    grads_out = [torch.randn_like(o) for o in ours]
    expected = torch.autograd.grad(plain(*weights), weights, grads_out)
    got = torch.autograd.grad(ours, weights, grads_out)
    for name, g, e in zip(('in_proj', 'x_proj', 'dt_projs', 'out_proj'), got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-12, atol=1e-12), name
    assert torch.autograd.gradcheck(layer.projections, [w.detach().requires_grad_() for w in weights])


@pytest.mark.parametrize('op', ['layer_norm', 'modulated_layer_norm', 'selective_scan'])
def test_backward_fills_no_zero_gradient_for_unused_outputs(op):
    """The ops' statistics and scan states get no gradient; autograd must not zero-fill one for them at every
    backward (a kernel launch each on the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmgroupmamba.kernels import layer_norm, modulated_layer_norm, selective_scan

    class Fills(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, y = (torch.randn(1, 4, 4, 8, requires_grad=True) for _ in range(2))
    w, b, scale = torch.randn(8), torch.randn(8), torch.rand(1, 8)
    u, delta = (torch.randn(1, 16, 8, requires_grad=True) for _ in range(2))
    bc, vec = torch.randn(1, 16, 8), torch.randn(8)
    run = {'layer_norm': lambda: layer_norm(x, w, b, 1e-5),
           'modulated_layer_norm': lambda: modulated_layer_norm(y, x, scale, w, b, 1e-5),
           'selective_scan': lambda: selective_scan(u, delta, vec, bc[..., :4], bc[..., 4:], vec, vec,
                                                    (4, 4))}[op]
    out = run()
    with Fills() as mode:
        out.backward(torch.ones_like(out))
    assert not {'zeros', 'zeros_like', 'new_zeros', 'zero_', 'fill_'} & set(mode.names), mode.names


def test_block_stochastic_depth_drops_whole_branches_per_image():
    from mmgroupmamba.models.groupmamba import GroupMambaBlock, add_dropped_branch
    torch.manual_seed(0)
    block = GroupMambaBlock(16, 2, drop_path=0.5)
    x, branch = torch.randn(64, 3, 3, 16), torch.randn(64, 3, 3, 16)
    block.train()
    mask, _ = block._keep_masks(x)
    out = add_dropped_branch(x, branch, mask)
    kept = torch.isclose(out, x + 2 * branch, atol=1e-6).flatten(1).all(1)
    dropped = (out == x).flatten(1).all(1)
    assert bool((kept ^ dropped).all())  # every image: its branch either kept (scaled by 1/keep) or dropped
    assert 16 < int(kept.sum()) < 48
    block.eval()
    assert block._keep_masks(x) == (None, None)


def test_training_after_inference_mode():
    """Nothing made under inference_mode (tilings, weights) may leak into a later training step (inference
    tensors cannot enter autograd)."""
    model = GroupMamba(arch=SMALL_ARCH)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in model(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_official_keys_round_trip_through_packed_parameters(golden):
    """official_to_packed / packed_to_official are inverse pure functions, state_dict() gives the official keys
    as views of the packed parameters, and load_state_dict takes official and packed keys alike."""
    from mmgroupmamba.models.groupmamba import official_to_packed, packed_to_official
    official = {k: v for k, v in golden['state_dict'].items() if not k.startswith(CLASSIFICATION_PREFIXES)}
    before = {k: v.clone() for k, v in official.items()}
    packed = official_to_packed(official)
    assert all(torch.equal(official[k], before[k]) for k in official)  # the input is untouched
    assert 'block3.1.attn.in_proj_weight' in packed and 'block3.1.attn.mamba_g1.in_proj.weight' not in packed
    model = GroupMamba(arch=golden['arch_cfg'])
    persistent = set(dict(model.named_buffers())) - {'keep_rates'}  # stochastic depth's, not checkpoint state
    assert set(packed) == set(dict(model.named_parameters())) | persistent
    back = packed_to_official(packed)
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)

    model.load_state_dict(official)
    state = model.state_dict()
    assert set(state) == set(official) and all(torch.equal(state[k], official[k]) for k in official)
    # Views: an in-place update through the official key (as EMA does) reaches the packed parameter.
    state['block2.0.attn.mamba_g3.Ds'].add_(1.0)
    assert torch.equal(model.block2[0].attn.Ds[32:48], official['block2.0.attn.mamba_g3.Ds'] + 1.0)
    other = GroupMamba(arch=golden['arch_cfg'])
    other.load_state_dict(official_to_packed(model.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))


def test_incomplete_official_layer_is_refused(golden):
    from mmgroupmamba.models.groupmamba import official_to_packed
    state = dict(golden['state_dict'])
    del state['block1.0.attn.mamba_g3.in_proj.weight']
    with pytest.raises(KeyError, match=r'block1\.0\.attn\.in_proj_weight.*mamba_g3'):
        official_to_packed(state)


def test_packed_parameters_keep_their_official_dimensionality():
    """Optimizer rules by ndim (no decay on 1-D parameters) treat packed and official parameters alike."""
    from mmgroupmamba.models.groupmamba import PACKED_PARAMS
    model = GroupMamba(arch=SMALL_ARCH)
    official = model.state_dict()
    layer = model.block2[0].attn
    for name, (official_name, _) in PACKED_PARAMS.items():
        packed = layer.get_parameter(name)
        single = official[f'block2.0.attn.mamba_g1.{official_name}']
        assert (packed.dim() == 1) == (single.dim() == 1), name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cast_together_keeps_every_weight_aligned(dtype):
    """The casted weights share one buffer, each at a 128-byte boundary as a tensor of its own would be: cuBLAS
    runs slower GEMM kernels on matrices at 2-byte offsets (seen on an H200), Triton specialises on 16 bytes."""
    from mmgroupmamba.models.groupmamba import CAST_ALIGN_BYTES, cast_together
    torch.manual_seed(0)
    params = [torch.randn(21, 348, requires_grad=True), torch.randn(21, requires_grad=True),
              torch.randn(348, 21, requires_grad=True), torch.randn(7, requires_grad=True)]
    parts = cast_together(params, dtype)
    base = parts[0].untyped_storage().data_ptr()
    for part, param in zip(parts, params):
        assert part.untyped_storage().data_ptr() == base  # one buffer: one cast
        assert (part.data_ptr() - base) % CAST_ALIGN_BYTES == 0
        assert part.dtype == dtype and torch.equal(part, param.detach().to(dtype))
    sum((part.float() * (i + 1)).sum() for i, part in enumerate(parts)).backward()
    for i, param in enumerate(params):
        assert torch.equal(param.grad, torch.full_like(param, i + 1.0))
    assert cast_together(params, torch.float32) == params  # nothing to cast: the parameters themselves


def test_cast_together_launches_one_cat_and_one_cast_each_way():
    """No fill for the padding between the parts, forward or backward (a launch each on the GPU), nor for a
    part that gets no gradient (one no loss reached): its parameter gets None from the cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmgroupmamba.models.groupmamba import cast_together

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                self.names.append(func.overloadpacket.__name__)
            return out

    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True),
              torch.randn(2, 9, requires_grad=True)]
    with Names() as forward:
        first, _, last = cast_together(params, torch.float16)
    grads = (torch.ones_like(first), torch.full_like(last, 2.0))
    with Names() as backward:
        torch.autograd.backward((first, last), grads)

    def launches(mode):
        return sorted(name for name in mode.names if not name.startswith('empty') and name != 'new_empty')

    assert launches(forward) == ['_to_copy', 'cat'], forward.names
    assert launches(backward) == ['_to_copy', 'cat'], backward.names
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert params[1].grad is None
    assert torch.equal(params[2].grad, torch.full_like(params[2], 2.0))


def test_backbone_draws_every_blocks_stochastic_depth_masks_at_once():
    """A training forward draws the masks of all the blocks that drop branches in one op (the per-block draws
    were two launches each), each block reading its row: per image, 0 or 1 / its keep rate; the first block (drop
    rate 0) and frozen stages' blocks drop nothing; evaluation draws nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmgroupmamba.models.groupmamba import draw_keep_masks

    class RandomOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if 'bernoulli' in str(func) or 'rand' in str(func):
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = GroupMamba(arch='mini', drop_path_rate=0.3).train()  # depths 1, 1, 2, 1: rates 0, .075, .15, .225, .3
    assert torch.allclose(model.keep_rates, torch.tensor([0.925, 0.85, 0.775, 0.7]))
    assert model._mask_rows == [[None], [0], [1, 2], [3]]
    x = torch.randn(2, 3, 64, 64)
    with RandomOps() as ops:
        model(x)
    assert ops.names == ['aten.bernoulli.default']
    model.eval()
    with RandomOps() as ops:
        model(x)
    assert ops.names == [] and model.keep_masks(x) is None

    torch.manual_seed(0)
    masks = draw_keep_masks(model.keep_rates, 4096)
    assert masks.shape == (4, 2, 4096, 1, 1, 1) and masks.dtype == torch.float32
    for row, keep in enumerate(model.keep_rates.tolist()):
        values = masks[row].flatten()
        assert torch.allclose(values.unique(), torch.tensor([0.0, 1 / keep]))
        assert abs((values > 0).float().mean().item() - keep) < 0.03

    # Frozen stage 1 and 2: their blocks stay in eval mode and get no masks; the others still draw in one op.
    frozen = GroupMamba(arch='mini', drop_path_rate=0.3, frozen_stages=2).train()
    seen = []
    for stage in (1, 2, 3):
        for block in getattr(frozen, f'block{stage}'):
            block.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[1] is None)))
    with RandomOps() as ops:
        frozen(x)
    assert ops.names == ['aten.bernoulli.default']
    assert seen == [(False, True), (False, True), (True, False), (True, False)]


@pytest.mark.parametrize('impl, channel_multiple', [('reference', 8), ('reference', 1), ('triton', 8)])
def test_residual_adds_inside_the_norms_match_the_plain_block(impl, channel_multiple, monkeypatch):
    """A stage adds each block's residual branches inside the norms that read the sums next (the FFN's norm, the
    next block's input norm, the stage's norm): outputs and gradients in training with stochastic depth as the
    plain block's (``x + DropPath(layer(x))``, ``x + DropPath(ffn(norm2(x)))``, each add apart) with the same
    masks, padded (20 and 44 channels stored as 24 and 48, ``channel_multiple=8``) and not."""
    from mmgroupmamba.models.groupmamba import GroupMambaBlock, add_dropped_branch
    monkeypatch.setenv('MMGM_KERNELS', impl)
    torch.manual_seed(0)
    arch = dict(stem_hidden_dim=16, embed_dims=[20, 32, 44, 64], mlp_ratios=[2, 2, 2, 2], depths=[2, 1, 2, 1])
    fused = GroupMamba(arch=arch, drop_path_rate=0.5, channel_multiple=channel_multiple).train()
    plain = copy.deepcopy(fused)
    for block in plain.modules():
        if isinstance(block, GroupMambaBlock):
            def apart(x, keep_masks, weights, residual, pending, block=block):
                assert residual is None and pending  # nothing is left pending: a stage's next block gets None
                attn_mask, mlp_mask = (None, None) if keep_masks is None else keep_masks
                attn_weights, mlp_weights = weights  # built for the stage, in the stored channels
                x = add_dropped_branch(x, block.attn(x, attn_weights), attn_mask)
                return add_dropped_branch(x, block.mlp(x, block.norm2, mlp_weights)[1], mlp_mask), None
            block.forward = apart
    x = torch.randn(3, 3, 32, 32)
    results = []
    for model in (fused, plain):
        torch.manual_seed(1)  # the same stochastic-depth masks
        inp = x.clone().requires_grad_()
        outs = model(inp)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        results.append([*outs, *torch.autograd.grad(loss, [inp, *model.parameters()])])
    torch.manual_seed(1)
    assert bool((fused.keep_masks(x) == 0).any())  # the runs' masks: some branch of some image dropped
    for i, (a, b) in enumerate(zip(*results)):  # some gradients are all zeros (a zero-initialised layer's)
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-8, i

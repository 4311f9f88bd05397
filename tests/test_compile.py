"""torch.compile of the backbone and the custom ops under it.

The backbone compiles as one graph (``fullgraph=True``) with symbolic sizes. On the CPU these tests compile with
the ``aot_eager`` backend: Dynamo's capture and AOTAutograd's forward/backward split with fake tensors, exactly
what Inductor receives, without Inductor's C++ code generation (minutes per graph on a 2-core machine). Inductor
itself is exercised on the GPU (benchmarks/check_gpu.py, benchmarks/backbone_speed.py --compile).
"""
import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

from mmgroupmamba import GroupMamba
from op_samples import opcheck_every_op
from scan_oracle import random_scan_inputs

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden'
CLASSIFICATION_PREFIXES = ('post_network.', 'head.', 'dist_head.')


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN / 'golden_mini_seed0.pt', weights_only=True)


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_opcheck_every_custom_op(impl, monkeypatch):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic shapes, on both
    implementations (Triton through the interpreter)."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    opcheck_every_op(torch.Generator().manual_seed(0))


def test_op_gradients_match_autograd_through_the_references():
    """The ops' registered backward formulas against plain autograd through the references, in float64."""
    from mmgroupmamba.kernels import (
        channel_affinity,
        channel_affinity_reference,
        depthwise_conv_act,
        depthwise_conv_act_reference,
        gated_group_norm,
        gated_group_norm_reference,
        modulated_layer_norm,
        modulated_layer_norm_reference,
        residual_layer_norm,
        selective_scan,
        selective_scan_reference,
    )
    gen = torch.Generator().manual_seed(1)
    scan = random_scan_inputs(2, (3, 5), 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y, z, x = (torch.randn(2, 3, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w, b = (torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = torch.rand(2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    conv_w = torch.randn(16, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    fc1_w, fc2_w = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                    for shape in ((3, 16), (16, 3)))
    fc1_b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    cases = [
        (selective_scan, selective_scan_reference,
         [scan[k] for k in ('u', 'delta', 'A_logs', 'B', 'C', 'D', 'delta_bias')], (scan['hw'],)),
        (gated_group_norm, gated_group_norm_reference, [y, z, w, b], (4, 1e-5)),
        (modulated_layer_norm, modulated_layer_norm_reference, [y, x, scale, w, b], (1e-5,)),
        (depthwise_conv_act, depthwise_conv_act_reference, [x, conv_w, b], ('gelu',)),
        (channel_affinity, lambda x, *params: channel_affinity_reference(x.mean((1, 2)), *params),
         [x, fc1_w, fc1_b, fc2_w, b, scale[0, :1]], ()),
        # Both outputs (the sum and its norm) at once; one image's branch dropped.
        (lambda x, y, w, b, keep: torch.cat(residual_layer_norm(x, y, keep, w, b, 1e-5), -1),
         lambda x, y, w, b, keep: residual_then_layer_norm(x, y * keep.view(-1, 1, 1, 1), w, b, 1e-5),
         [x, y, w, b], (torch.tensor([0.0, 1.25], dtype=torch.float64),)),
        (lambda x, y, w, b: torch.cat(residual_layer_norm(x, y, None, w, b, 1e-5), -1),
         lambda x, y, w, b: residual_then_layer_norm(x, y, w, b, 1e-5), [x, y, w, b], ()),
    ]
    for op, reference, tensors, constants in cases:
        out = op(*tensors, *constants)
        grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        ours = torch.autograd.grad(out, tensors, grad_out)
        expected = torch.autograd.grad(reference(*tensors, *constants), tensors, grad_out)
        for g, e in zip(ours, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def residual_then_layer_norm(x, branch, w, b, eps):
    """The residual sum and its LayerNorm as plain ops, side by side along the channels."""
    total = x + branch
    return torch.cat([total, torch.nn.functional.layer_norm(total, total.shape[-1:], w, b, eps)], -1)


def compiled_entries():
    """How many compiled versions of the backbone's forward Dynamo holds (one per guard set it compiled)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(GroupMamba._forward.__code__))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def golden_model(golden, **kwargs):
    model = GroupMamba(arch=golden['arch_cfg'], **kwargs)
    model.load_state_dict(golden['state_dict'], strict=False)
    return model


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_compiled_backbone_gives_golden_outputs_and_eager_gradients(golden, impl, monkeypatch, fresh_dynamo):
    """fullgraph=True (a graph break raises), dynamic sizes: the official outputs, and eager's gradients for the
    input and every parameter, in train mode."""
    monkeypatch.setenv('MMGM_KERNELS', impl)
    compiled = golden_model(golden, compile=dict(backend='aot_eager')).eval()
    eager = golden_model(golden).eval()
    with torch.no_grad():
        for out, expected in zip(compiled(golden['input']), golden['stage_outputs']):
            assert rel_err(out, expected) <= 1e-4
    compiled.train(), eager.train()
    x = golden['input'][:, :, :40, :48] if impl == 'triton' else golden['input']  # the interpreter is slow
    grads = []
    for model in (compiled, eager):
        inp = x.clone().requires_grad_()
        loss = sum((o * o).sum() for o in model(inp))
        grads.append(torch.autograd.grad(loss, [inp, *model.parameters()]))
    for name, a, b in zip(['input'] + [n for n, _ in eager.named_parameters()], *grads):
        # A one-element gradient (a block's skip_scale) is one fp32 sum over a whole map of terms of both signs,
        # which the compiled graph and eager add in different orders: 1.5e-5 apart on one CPU (twenty-seventh
        # session), within 1e-5 on others. The other gradients were within 1.4e-6 there (reference path).
        assert rel_err(a, b) <= (1e-4 if a.numel() == 1 else 1e-5), name
    assert compiled_entries() == 2  # no grad, and grad


@pytest.mark.parametrize('out_type', ['avg_featmap', 'cls_token'])
def test_compiled_pooled_out_types_match_eager(golden, out_type, fresh_dynamo):
    """The pooled outputs trace in one graph too (fullgraph=True) and give eager's values and gradients."""
    compiled = golden_model(golden, out_type=out_type, compile=dict(backend='aot_eager')).train()
    eager = golden_model(golden, out_type=out_type).train()
    grads = []
    for model in (compiled, eager):
        (out, ) = model(golden['input'])
        grads.append((out.detach(), *torch.autograd.grad((out * out).sum(), list(model.parameters()))))
    # Not rel_err: the class block's A_logs gets an exactly zero gradient (a scan of one token never uses A).
    # Traced, the step sizes' projection is a broadcast product summed, eagerly a bmm (_batched_product): fp32
    # rounds them differently, and skip_scale's gradient (a sum with much cancellation) moves by up to about 6e-5.
    for name, a, b in zip(['output'] + [n for n, _ in eager.named_parameters()], *grads):
        assert (a - b).norm() <= 2e-4 * b.norm(), name


def test_new_input_sizes_reuse_the_compiled_graph(golden, fresh_dynamo):
    """Three sizes, one graph: sizes are symbolic (dynamic=True), so detection batches of new sizes do not
    each compile anew. And that graph is traced once: the modules' floats (norms' eps, drop-path rates) are
    constants from the start, where symbolic floats that our ops then specialise made Dynamo restart its whole
    analysis (compiled.compile_context)."""
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics
    clear_compilation_metrics()
    model = golden_model(golden, compile=dict(backend='aot_eager')).train()
    for hw in [(64, 64), (72, 88), (96, 64)]:  # a square first: sizes are not tied (compiled.compile_context)
        x = torch.randn(2, 3, *hw, requires_grad=True)
        sum(o.sum() for o in model(x)).backward()
    assert compiled_entries() == 1
    metrics = get_compilation_metrics()
    assert metrics and [m.restart_reasons for m in metrics] == [set()] * len(metrics)


def test_compile_under_autocast(golden, fresh_dynamo):
    model = golden_model(golden, compile=dict(backend='aot_eager')).train()
    eager = golden_model(golden).train()
    x = golden['input']
    outs = []
    for m in (model, eager):
        with torch.autocast('cpu', dtype=torch.float16):
            out = m(x)
        outs.append(out)
        sum(o.float().sum() for o in out).backward()
    # fp16 results of the same math traced and run op by op: equal up to fp16 rounding (0.05 % a rounding,
    # compounded over the blocks; sums such as skip_scale's gradient collect it from every position).
    for a, b in zip(*outs):
        assert a.dtype == b.dtype == torch.float32 and rel_err(a, b) <= 1e-2
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) <= 3e-2, name


def test_compile_option_is_checked_and_copies_start_uncompiled(golden):
    with pytest.raises(KeyError, match=r"unknown compile option\(s\) \['modee'\]"):
        GroupMamba(arch=golden['arch_cfg'], compile=dict(modee='max-autotune'))
    with pytest.raises(TypeError, match='compile must be a bool or a dict'):
        GroupMamba(arch=golden['arch_cfg'], compile='yes')
    with pytest.raises(ValueError, match="cuda_graph and compile cannot be combined"):
        GroupMamba(arch=golden['arch_cfg'], compile=True, cuda_graph=True)
    model = golden_model(golden, compile=dict(backend='eager'))
    model.eval()(golden['input'])
    assert model._compiled._compiled is not None
    copied = copy.deepcopy(model)
    assert copied._compiled._compiled is None and copied._compiled.options == model._compiled.options
    assert model._compiled.options['dynamic'] and model._compiled.options['fullgraph']


def test_inductor_defaults_reach_torch_compile_and_yield_to_the_callers_options(golden):
    """GroupMamba's compile gets its Inductor defaults (with strict output strides), an option the caller names
    wins over its default, other backends get no Inductor options, and mmdet's Swin-T compiled by the hook gets
    only Inductor's own defaults."""
    from mmgroupmamba.models.compiled import CompiledForward
    from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS

    options = GroupMamba(arch=golden['arch_cfg'], compile=True)._compiled.options['options']
    assert options == {**COMPILE_INDUCTOR_DEFAULTS, 'strict_output_strides': True}
    options = GroupMamba(arch=golden['arch_cfg'],
                         compile=dict(options={'combo_kernels': False, 'max_autotune': True}))._compiled.options
    assert options['options'] == {'force_pointwise_cat': True, 'combo_kernels': False, 'max_autotune': True,
                                  'static_launch_user_defined_triton_kernels': True, 'strict_output_strides': True}
    assert 'options' not in GroupMamba(arch=golden['arch_cfg'], compile=dict(backend='aot_eager'))._compiled.options
    assert CompiledForward('SwinTransformer', {}).options['options'] == {'strict_output_strides': True}


@pytest.mark.parametrize('static', [True, False])
def test_compile_workers_are_told_to_launch_our_kernels_statically(static, monkeypatch):
    """Asked for static launches of our kernels, the first compile sets the environment variable Inductor's
    compile workers read when they start (they get no other way to it); not where the option is off, nor over
    the user's own setting; and where the workers are already running, it warns that they cannot honour it."""
    from types import SimpleNamespace

    from torch._inductor.async_compile import AsyncCompile

    from mmgroupmamba.models.compiled import STATIC_USER_KERNELS, STATIC_USER_KERNELS_ENV, CompiledForward

    pool_started = []
    monkeypatch.setattr(AsyncCompile, 'process_pool',
                        SimpleNamespace(cache_info=lambda: SimpleNamespace(currsize=len(pool_started))))
    monkeypatch.setattr(torch, 'compile', lambda forward, **options: forward)

    def first_call():
        CompiledForward('GroupMamba', {}, {STATIC_USER_KERNELS: static})(lambda x: x + 1, torch.zeros(1))

    monkeypatch.delenv(STATIC_USER_KERNELS_ENV, raising=False)
    first_call()
    assert os.environ.get(STATIC_USER_KERNELS_ENV) == ('1' if static else None)
    monkeypatch.setenv(STATIC_USER_KERNELS_ENV, '0')
    first_call()
    assert os.environ[STATIC_USER_KERNELS_ENV] == '0'
    monkeypatch.delenv(STATIC_USER_KERNELS_ENV)
    pool_started.append(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first_call()
    assert STATIC_USER_KERNELS_ENV not in os.environ
    assert [str(w.message) for w in caught if STATIC_USER_KERNELS_ENV in str(w.message)] == (
        [f"GroupMamba: Inductor's compile workers started before this compile without {STATIC_USER_KERNELS_ENV}=1, "
         "so they launch its Triton kernels through Triton's Python launcher (more host time a launch); set it in "
         "the environment to launch them statically"] if static else [])


def test_a_compile_mode_becomes_inductor_options_beside_the_defaults(golden):
    """torch.compile refuses a mode together with options, and the backbone always passes its Inductor defaults:
    a mode is turned into its options (PyTorch's table), which torch.compile then accepts; the caller's own
    options stay over them, and an unknown mode is refused with its name."""
    from mmgroupmamba.models.compiled import CompiledForward
    from mmgroupmamba.models.groupmamba import COMPILE_INDUCTOR_DEFAULTS

    compiled = GroupMamba(arch=golden['arch_cfg'], compile=dict(mode='reduce-overhead'))._compiled
    assert 'mode' not in compiled.options
    assert compiled.options['options'] == {**COMPILE_INDUCTOR_DEFAULTS, 'strict_output_strides': True,
                                           'triton.cudagraphs': True}
    torch.compile(lambda x: x, **compiled.options)  # raised "Either mode or options can be specified" before
    options = CompiledForward('SwinTransformer', dict(mode='max-autotune', options={'triton.cudagraphs': False}))
    assert options.options['options']['max_autotune'] and not options.options['options']['triton.cudagraphs']
    with pytest.raises(RuntimeError, match='bogus'):
        CompiledForward('SwinTransformer', dict(mode='bogus'))


def test_compiled_stochastic_depth_matches_eager_under_autocast(golden, fresh_dynamo):
    """Stochastic depth traced in the one graph (its masks drawn, its residual adds with their one-multiply
    backward written in the branch's dtype): from one generator state, the compiled step drops the same images
    as eager and gives its outputs and gradients."""
    compiled = golden_model(golden, drop_path_rate=0.5, compile=dict(backend='aot_eager')).train()
    eager = golden_model(golden, drop_path_rate=0.5).train()
    x = golden['input'].repeat(4, 1, 1, 1)  # images enough for both kept and dropped branches
    outs, grads = [], []
    for model in (compiled, eager):
        torch.manual_seed(0)
        with torch.autocast('cpu', dtype=torch.float16):
            out = model(x)
        outs.append(out)
        grads.append(torch.autograd.grad(sum(o.float().sum() for o in out), list(model.parameters())))
    # Equal up to fp16 rounding, as in test_compile_under_autocast; a different mask would be off by O(1).
    for a, b in zip(*outs):
        assert a.dtype == b.dtype == torch.float32 and rel_err(a, b) <= 1e-2
    for name, a, b in zip([n for n, _ in eager.named_parameters()], *grads):
        assert a.dtype == b.dtype == torch.float32 and rel_err(a, b) <= 3e-2, name
    assert compiled_entries() == 1


def test_compiled_projections_match_eager(fresh_dynamo):
    """Traced by torch.compile, the step sizes' projection and its gradients are broadcast products that Inductor
    fuses (``_batched_product``) instead of ``bmm``s: the same values and gradients as eagerly (float64)."""
    from mmgroupmamba.models.groupmamba import GroupMambaLayer
    torch.manual_seed(0)
    layer = GroupMambaLayer(48).double()
    weights = [p.detach().clone().requires_grad_() for p in layer.matmul_params()[:4]]
    eager = layer.projections(*weights)
    grads_out = [torch.randn_like(o) for o in eager]
    expected = torch.autograd.grad(eager, weights, grads_out)
    compiled = torch.compile(layer.projections, backend='aot_eager', fullgraph=True)(*weights)
    got = torch.autograd.grad(compiled, weights, grads_out)
    for name, a, b in zip(('in_proj', 'delta_bc_proj', 'out_proj'), compiled, eager):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    for name, g, e in zip(('in_proj', 'x_proj', 'dt_projs', 'out_proj'), got, expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-12), name


def test_write_analysis_is_kept_by_kernel_and_arguments_inside_the_compile_context(monkeypatch):
    """``compile_context`` (around every compiled forward): PyTorch's analysis of which arguments a Triton
    launch writes runs once per kernel and arguments' key (sizes symbolic or not, tensors by dtype, an autotuner by
    the kernel in it), each caller gets its own copy, real tensors are not keyed, and on exit PyTorch's function
    and the backward's lazy lowering are as they were. The analysis itself, counted here by a stand-in, is
    PyTorch's (TTIR needs a GPU target); that the compiled wrappers come out the same with the cache is
    ``test_compiled_kernels.py``'s."""
    import sympy
    import triton
    from torch._functorch import config as functorch_config
    from torch._higher_order_ops import triton_kernel_wrap
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmgroupmamba.kernels.triton_affinity import _affinity_fwd_kernel
    from mmgroupmamba.models import compiled

    name = next(n for n in compiled._WRITE_ANALYSES if hasattr(triton_kernel_wrap, n))
    calls = []

    def analysis(kernel, kwargs, tma_descriptor_metadata=None):
        calls.append(kwargs)
        return {'writes': ['Out']}

    monkeypatch.setattr(triton_kernel_wrap, name, analysis)
    monkeypatch.setattr(compiled, '_ANALYSED', {})
    with FakeTensorMode():
        x, out, half = torch.empty(4, 8), torch.empty(4, 8), torch.empty(4, 8, dtype=torch.float16)

    def analyse(kernel=_affinity_fwd_kernel, **kwargs):
        return getattr(triton_kernel_wrap, name)(kernel, {'X': x, 'Out': out, 'C': 8, **kwargs}, {})

    lazy = functorch_config.force_non_lazy_backward_lowering
    with compiled.compile_context():
        assert functorch_config.force_non_lazy_backward_lowering
        first = analyse(N=sympy.Symbol('s0'))
        again = analyse(N=sympy.Symbol('s1'))  # another symbolic size: the TTIR sees one placeholder for both
        assert first == again == {'writes': ['Out']} and first is not again and len(calls) == 1
        analyse(N=sympy.Symbol('s0'), C=16)
        analyse(N=sympy.Symbol('s0'), X=half)
        assert len(calls) == 3
        analyse(N=sympy.Symbol('s0'), X=torch.empty(4, 8))  # a real tensor: its address could specialise
        analyse(N=sympy.Symbol('s0'), X=torch.empty(4, 8))
        assert len(calls) == 5
        tuned = [triton.autotune([triton.Config({'BLOCK': 16})], key=[])(_affinity_fwd_kernel) for _ in range(2)]
        analyse(kernel=tuned[0], N=3)
        analyse(kernel=tuned[1], N=3)  # another launch site's autotuner around the same kernel and config
        analyse(N=3, BLOCK=16)
        assert len(calls) == 6
        for _ in range(2):  # a call form other than (kernel, kwargs, tma_descriptor_metadata) passes uncached
            getattr(triton_kernel_wrap, name)(_affinity_fwd_kernel, {'X': x, 'Out': out, 'C': 8, 'N': 3})
        assert len(calls) == 8
    assert getattr(triton_kernel_wrap, name) is analysis
    assert functorch_config.force_non_lazy_backward_lowering == lazy
    analyse(N=3, BLOCK=16)
    assert len(calls) == 9  # outside the context, PyTorch's own behaviour: no cache


def test_compiled_concatenations_do_not_grow_with_the_stage_depth(fresh_dynamo):
    """Inductor lowers a concatenation to one pointwise kernel whose elements test every piece in turn: the
    stage-wide weight cast of a 21-block stage (GroupMamba-B) made one with 336 pieces, 95 ms of a 159 ms det step
    on an H100. Traced, the weights are cast a block at a time, so the largest concatenation in the forward and
    backward graphs is the same for a stage of 2 blocks and of 6."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def largest_concatenation(depth):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm)

        torch._dynamo.reset()
        torch.manual_seed(0)
        arch = dict(stem_hidden_dim=8, embed_dims=[16, 16, 32, 32], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, depth, 1])
        model = GroupMamba(arch=arch, compile=dict(backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))).train()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(torch.randn(1, 3, 64, 64))
        sum(o.float().sum() for o in out).backward()
        assert len(graphs) == 2  # the forward graph, then the backward graph
        return max(len(node.args[0]) for gm in graphs for node in gm.graph.nodes
                   if node.target is torch.ops.aten.cat.default)

    assert largest_concatenation(6) == largest_concatenation(2)

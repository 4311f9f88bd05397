"""The fused ops' eager fast path (``kernels/ops_util.py``, ``FusedOp``): plain eager calls run the op's
implementation without the dispatcher, with the op's own autograd formula, and give the op's results bit for
bit; traced calls, dispatch modes and tensor subclasses go through the op.

Both implementations are checked; the Triton one through Triton's interpreter (conftest.py).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmgroupmamba.kernels import layer_norm
from mmgroupmamba.kernels.gated_norm import gated_group_norm_fwd
from mmgroupmamba.kernels.ops_util import FusedOp
from mmgroupmamba.models.groupmamba import GroupMambaBlock
from op_samples import BACKWARD_OPS, op_samples


class OpCalls(TorchDispatchMode):
    """Passes every op through, and records the ``mmgroupmamba`` custom ops that reach it."""

    def __init__(self):
        super().__init__()
        self.custom_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == 'mmgroupmamba':
            self.custom_ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted_op_calls(monkeypatch):
    """Calls through ``gated_group_norm_fwd``'s custom op (the dispatcher), counted."""
    calls = []
    op = gated_group_norm_fwd.op

    def through_dispatcher(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(gated_group_norm_fwd, 'op', through_dispatcher)
    return calls


def assert_bitwise_equal(got, expected, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g is None) == (e is None), (what, i)
        if g is not None:
            assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e), (what, i)


def value_and_grads(call, args, gen):
    """The op's outputs and, for a differentiable op, the gradients of its first output for a random
    gradient (its statistics and states get none, as in the layers)."""
    out = call(*args)
    first = out[0] if isinstance(out, tuple) else out
    inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    if not first.requires_grad:
        return out, ()
    grad = torch.randn(first.shape, generator=gen, dtype=first.dtype)
    return out, torch.autograd.grad(first, inputs, grad, allow_unused=True)


@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_fast_path_equals_the_op_bitwise(impl, monkeypatch):
    monkeypatch.setenv('MMGM_KERNELS', impl)
    for op, args in op_samples(torch.Generator().manual_seed(0)):
        if op in BACKWARD_OPS:
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        name = op.op._name
        fast, fast_grads = value_and_grads(op, args, torch.Generator().manual_seed(1))
        slow, slow_grads = value_and_grads(op.op, args, torch.Generator().manual_seed(1))
        assert_bitwise_equal(fast, slow, f'{name} outputs')
        assert_bitwise_equal(fast_grads, slow_grads, f'{name} gradients')
        assert (op not in BACKWARD_OPS) == bool(fast_grads), name
        with torch.no_grad():
            assert_bitwise_equal(op(*args), slow, f'{name} outputs without grad')


@pytest.mark.parametrize('autocast', [False, True])
def test_block_step_equals_the_op_path_bitwise(autocast, monkeypatch):
    """A block's forward and backward (the fused linear layers' autograd Functions, the backward ops) in plain
    eager against the same step with every custom op called through the dispatcher.

    The op path is forced by hand, not by a dispatch mode: under autocast, ops that run inside a mode's
    ``__torch_dispatch__`` are not autocast, so a mode would change the results by itself."""
    torch.manual_seed(0)
    block = GroupMambaBlock(32, 4, drop_path=0.0).train()
    x = torch.randn(1, 8, 8, 32)

    def step():
        block.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = block(inp)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach(), inp.grad, *(p.grad for p in block.parameters())]

    fast = step()
    through_dispatcher = []

    def call_the_op(self, *args):
        through_dispatcher.append(self.op._name)
        return self.op(*args)

    monkeypatch.setattr(FusedOp, '__call__', call_the_op)
    through_op = step()
    assert {'selective_scan_bwd', 'dwconv_act_bwd', 'gated_group_norm_bwd'} <= set(through_dispatcher)
    assert_bitwise_equal(fast, through_op, 'block step')


def test_plain_eager_skips_the_dispatcher(counted_op_calls):
    x = torch.randn(2, 4, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8)
    out = layer_norm(x, torch.nn.Parameter(w), b, 1e-5)
    assert type(out.grad_fn).__name__.startswith('gated_group_norm_fwd_eager')
    out.sum().backward()
    with torch.no_grad():
        layer_norm(x, w, b, 1e-5)
    assert counted_op_calls == []


def test_dispatch_modes_and_subclasses_go_through_the_op(counted_op_calls):
    x, w, b = torch.randn(2, 4, 8), torch.randn(8), torch.randn(8)
    with OpCalls() as mode:
        layer_norm(x, w, b, 1e-5)
    assert mode.custom_ops == ['mmgroupmamba::gated_group_norm_fwd'] and len(counted_op_calls) == 1

    from torch._subclasses.fake_tensor import FakeTensorMode
    fake = FakeTensorMode(allow_non_fake_inputs=True).from_tensor(x)
    # No mode is entered here: the fake tensor is a tensor subclass among plain ones.
    assert layer_norm(fake, w, b, 1e-5).shape == x.shape
    assert len(counted_op_calls) == 2


def test_torch_compile_traces_the_op(counted_op_calls):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    x, w, b = torch.randn(2, 4, 8), torch.randn(8), torch.randn(8)
    compiled = torch.compile(lambda t: layer_norm(t, w, b, 1e-5), backend=record, fullgraph=True)
    assert torch.equal(compiled(x), layer_norm(x, w, b, 1e-5))
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert 'mmgroupmamba.gated_group_norm_fwd.default' in targets, targets

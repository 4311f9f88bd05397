"""Pieces shared by the custom ops' implementations."""
import contextlib
import functools

import torch
from torch._library.triton import is_wrap_triton_enabled, wrap_triton_enabled
from torch.library import wrap_triton

from .dispatch import interpreter_requested, use_triton

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)


def fused_op(name, reference):
    """Decorator: the Triton implementation ``fn`` and its PyTorch ``reference`` (the same signature) as one
    custom op ``name`` (``torch.library.triton_op``), returned as a :class:`FusedOp` that callers call like the
    op; register its fake implementation (``@op.register_fake``) and autograd formula (``op.register_autograd``)
    on the result as for any custom op.

    Which of the two runs is decided here, for every op, from the first argument
    (:func:`~mmgroupmamba.kernels.dispatch.use_triton`: ``MMGM_KERNELS``, CUDA or not). Where the op runs
    compiled Triton kernels, AOTAutograd traces into ``fn``: its kernels (launched through
    ``torch.library.wrap_triton``) and tensor ops become nodes of the compiled graph, which Inductor launches
    from its own generated code. A custom op that stays opaque is called through the dispatcher and runs its
    Python launcher at every call: that host work kept the compiled backbone host-bound (README,
    torch.compile). On the reference path, and under Triton's interpreter (whose kernels are Python functions
    that need real data), the op stays one opaque node, its registered fake giving the shapes. Plain eager calls
    skip the dispatcher altogether (:class:`FusedOp`).
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def register(fn):
        @functools.wraps(fn)  # the op's schema is inferred from fn's annotations
        def implementation(*args):
            return (fn if use_triton(args[0]) else reference)(*args)

        op = torch.library.triton_op(name, implementation, mutates_args=())

        def functional_rule(mode, func, types, args, kwargs):
            if use_triton(args[0]) and not interpreter_requested():
                with mode:
                    return fn(*args, **kwargs)
            return mode.__torch_dispatch__(func, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, functional_rule)
        return FusedOp(op, implementation)

    return register


# Tensor types whose eager calls may skip the dispatcher: a Parameter dispatches as the tensor it holds.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def traced(args):
    """Whether a call with ``args`` is traced rather than run: by torch.compile or export, with fake, functional
    or proxy tensors, under a torch.func transform (whose wrapped tensors look like plain ones), or with tensor
    subclasses among the arguments. A mode that only watches (a counter, a logger) is no trace."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    modes = torch._C._TorchDispatchModeKey
    if any(torch._C._get_dispatch_mode(key) is not None for key in (modes.FAKE, modes.PROXY, modes.FUNCTIONAL)):
        return True
    return not all(type(a) in _PLAIN_TENSOR_TYPES or not isinstance(a, torch.Tensor) for a in args)


# The argument types of a plain eager call: plain tensors and the other types the ops' schemas take. Any other
# type (a tensor subclass, a symbolic size) sends the call through the op.
_PLAIN_ARG_TYPES = frozenset(_PLAIN_TENSOR_TYPES + (int, float, bool, str, list, torch.dtype, type(None)))


def _plain_eager(args):
    """Whether a call with ``args`` is plain eager work that nothing watches: not compiled, under no torch.func
    transform, no dispatch mode (tracing's fake, proxy and functional modes are on that stack too; counters too
    must see the op) and no torch-function mode, and every argument of a type in ``_PLAIN_ARG_TYPES``. What
    :func:`traced` asks and more, in C calls only: it is asked at every eager call of every fused op, and a
    Python loop over the arguments cost about a microsecond a call."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or not _PLAIN_ARG_TYPES.issuperset(map(type, args)))


class FusedOp:
    """A fused custom op as its callers call it, positionally: ``op(*args)``, the op's tuple (or tensor) back.

    Through the dispatcher, a custom op's call costs tens of microseconds of host time before its implementation
    runs (torch.library's backend and autograd wrappers and redispatch; 147 us against F.layer_norm's 20 us on
    an H200 host), and an eager training step is bound by its host. Plain eager calls (:func:`_plain_eager`)
    therefore run the same implementation directly: as it is where no gradient is needed, else through an
    ``autograd.Function`` made of the ``setup_context`` and ``backward`` given to :meth:`register_autograd`, the
    formula the op itself registers. The results are those of the op, bit for bit. As inside the op
    (``triton_op``'s own backend function does the same), wrapping is off, so the launchers' ``launchable`` hands
    back the plain Triton kernels: left on, every launch would go through the higher-order op meant for tracing (on an
    H200 host that made each fast call 2.5x slower than the dispatcher it skips, and the eager det step 1.8x).
    Every other call (torch.compile, opcheck, fake tensors, dispatch modes such as benchmarks/launch_count.py's
    counter) goes through the op, ``self.op`` (the ``CustomOpDef``), which they need."""

    def __init__(self, op, implementation):
        self.op = op
        self._implementation = implementation
        self._autograd_function = None
        functools.update_wrapper(self, implementation)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        implementation = self._implementation

        # forward with ctx, calling setup_context itself: a Function with a separate setup_context binds its
        # arguments through inspect.signature at every apply (torch 2.11), host time the step cannot spare.
        def forward(ctx, *args):
            output = implementation(*args)
            setup_context(ctx, args, output)
            return output

        self._autograd_function = type(f'{self.__name__}_eager', (torch.autograd.Function,), {
            'forward': staticmethod(forward), 'backward': staticmethod(backward)})

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if self._autograd_function is None:
                # An op without a formula (the backward ops, under double backward): the op's outputs then raise
                # at backward, where the implementation's would silently carry no gradient.
                return self.op(*args)
            run = self._autograd_function.apply
        else:
            run = self._implementation
        # wrap_triton off for the launchers, as torch.library.set_wrap_triton_enabled(False) turns it off, without
        # that context manager's generator (2-3 us a call on the CPU, every fused op's eager call pays it).
        enabled = is_wrap_triton_enabled()
        wrap_triton_enabled.value = False
        try:
            return run(*args)
        finally:
            wrap_triton_enabled.value = enabled


def launchable(kernel):
    """``torch.library.wrap_triton(kernel)``: the kernel itself where wrapping is off (the fused ops' eager calls,
    :class:`FusedOp`), without ``wrap_triton``'s own checks of the kernel's type, which cost about 5 us a launch
    on the CPU; the traceable wrapper where it is on (torch.compile, opcheck)."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


def size_hint(n):
    """A size as a plain int: itself, or, for a symbolic size while a graph is traced, its value in the
    example being traced (no guard is added). For tiling choices only: any tiling is correct for any size,
    so a graph compiled for one size stays correct for the others; counts derived from sizes (grids, chunks)
    stay symbolic."""
    if isinstance(n, int):
        return n
    hint = n.node.hint
    if hint is None:
        raise ValueError(f'symbolic size {n} has no example value to choose a tiling by')
    return int(hint)


def cdiv(x, y):
    """``ceil(x / y)`` for sizes, plain or symbolic: ``triton.cdiv``'s arithmetic without the wrapper through
    which Triton runs its constexpr functions on the host (it unwraps every argument), which the launchers would
    pay several times a launch."""
    return (x + y - 1) // y


def next_power_of_2(n):
    """The smallest power of 2 >= ``n``: ``triton.next_power_of_2``'s arithmetic, without its wrapper (see
    :func:`cdiv`)."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def cast(t, dtype):
    """``t.to(dtype)``, without the call where ``t`` is already in ``dtype``: most of the backward's casts
    change nothing (an fp32 gradient for an fp32 parameter), and each call still passes PyTorch's dispatcher, a
    microsecond or more of the eager step's host time (``benchmarks/host_proxy.py`` counts them)."""
    return t if t.dtype == dtype else t.to(dtype)


# A backward op asked for its recomputed output (``need_output``) returns it with ``ONES_COLUMNS`` more columns:
# ones, then zeros. The following linear layer's weight-gradient matmul (fused_linear.py) then returns the bias
# gradient as one more column, without a reduction that reads the output gradient again (kernels/README.md,
# "bias-gradient sums"). 16, not 8: with the maps' channels a multiple of 16, every row of a 2-byte map then
# starts on a 32-byte sector, which took 0.35 ms off an H100's graphed det step of GroupMamba-T against 8 (the FFN
# conv's backward, the gated norm's and the weight-gradient matmuls: kernels/README.md, "The ones column's
# pitch"). Every stored width is such a multiple (``layout.CHANNEL_MULTIPLE``). Before it was, a width-dependent
# column for GroupMamba-B's stage 3 (424 channels: rows up to 432 instead of 440) was built (05b843f) and measured
# slower on an H100: B's gated norm backward 54.0-54.3 against 49.4 us a launch in the graphed det step (README,
# forty-sixth session); storing that stage as 432 channels is what made its rows aligned.
ONES_COLUMNS = 16


def with_ones_column(out):
    """``out`` with the ``ONES_COLUMNS`` columns after its own: ones, then zeros (the reference's form)."""
    pad = out.new_zeros((*out.shape[:-1], ONES_COLUMNS))
    pad[..., 0] = 1
    return torch.cat([out, pad], -1)


def with_ones_column_shape(shape):
    """The shape of :func:`with_ones_column`'s result for an output of ``shape``."""
    return (*shape[:-1], shape[-1] + ONES_COLUMNS)


def reduced_dtype(t):
    """The dtype of the gradients the kernels reduce over many elements (weights, biases): fp32, or fp64 for
    fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def empty(like, dtype=None):
    """A 0-element tensor on ``like``'s device: the value of an op output that a path does not produce (custom
    ops return a fixed tuple of tensors)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd back on inside a custom op's implementation, where the dispatcher has switched it off (the op is
    below autograd: its own gradient is the registered formula). The reference path's backward ops differentiate
    the reference with it. torch.func would do the same without touching dispatch keys, but its wrapped tensors
    break the schema and fake-tensor checks of torch.library.opcheck."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def reference_grads(fn, inputs, grad_out, need_output=False):
    """Gradients of ``fn(*inputs)`` for ``grad_out``, by autograd through the reference. ``None`` inputs get
    ``None``; gradients that do not reach an input are zeros. Returns the gradients and, with ``need_output``,
    the output with its ones column (:func:`with_ones_column`; both contiguous, as the Triton path and the fake
    implementations give them)."""
    with autograd_inside_op():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        wanted = [t for t in leaves if t is not None]
        found = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype), allow_unused=True))
    grads = []
    for t in leaves:
        g = None if t is None else next(found)
        grads.append(None if t is None else (torch.zeros_like(t) if g is None else g).contiguous())
    return tuple(grads), (with_ones_column(out.detach()) if need_output else None)

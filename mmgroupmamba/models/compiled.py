"""A module's forward run through ``torch.compile``, compiled on first use (the backbones' ``compile`` option)."""
import contextlib
import copy
import os
import warnings

import torch

DEFAULTS = dict(dynamic=True, fullgraph=True)
COMPILE_KEYS = ('mode', 'dynamic', 'fullgraph', 'backend', 'options')


def _has_inductor_option(name):
    import torch._inductor.config as inductor_config
    return hasattr(inductor_config, name)


class CompiledForward:
    """``torch.compile(forward, **options)``, built at the first call.

    ``dynamic=True`` by default: detection batches come in many sizes, and one graph with symbolic sizes serves
    them all instead of a compile per size. ``fullgraph=True`` by default: a graph break is a bug to fix, not
    something to run around silently. ``inductor_defaults``: Inductor options (``torch.compile``'s ``options``)
    that the caller's backbone compiles best with, each kept unless ``options`` names it.

    Not an ``nn.Module`` and not copied: copies of the module (``deepcopy`` for EMA, pickling) start
    uncompiled and compile their own forward when first called.
    """

    def __init__(self, name, options, inductor_defaults=None):
        if options is True:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f'{name}: compile must be a bool or a dict of torch.compile arguments, got {options!r}')
        unknown = sorted(set(options) - set(COMPILE_KEYS))
        if unknown:
            raise KeyError(f'{name}: unknown compile option(s) {unknown}; torch.compile takes {list(COMPILE_KEYS)}')
        self.name = name
        self.options = {**DEFAULTS, **options}
        if self.options.get('backend', 'inductor') == 'inductor':
            defaults = dict(inductor_defaults or {})
            # Saved activations that are views of channels-last maps (the stem's and downsampling convs' outputs,
            # permuted to NHWC) are graph outputs to Inductor. With symbolic sizes, torch 2.14's Inductor cannot
            # order their strides (it compares expressions like 32 < 32*(W//4 + 1) without the size facts) and
            # fails; asked to keep their exact strides it does not need to order them. (Older releases have no
            # such option and do not fail there.)
            defaults['strict_output_strides'] = True
            # Inductor options a torch release lacks are left out (torch.compile would reject them); the
            # caller's own ``options`` are passed as given, each over the default of the same name.
            defaults = {k: v for k, v in defaults.items() if _has_inductor_option(k)}
            # torch.compile takes a mode or options, never both, and a mode is a set of Inductor options: looked up
            # in PyTorch's own table, they join the defaults (``mode='reduce-overhead'``: CUDA graphs), the
            # caller's options still over them.
            mode = self.options.pop('mode', None)
            if mode is not None:
                from torch._inductor import list_mode_options
                defaults.update(list_mode_options(mode, self.options['dynamic']))
            if defaults:
                self.options['options'] = {**defaults, **self.options.get('options', {})}
        self._compiled = None

    def __call__(self, forward, *args, **kwargs):
        if self._compiled is None:
            if self.options.get('options', {}).get(STATIC_USER_KERNELS):
                static_user_kernels_in_compile_workers(self.name)
            self._compiled = torch.compile(forward, **self.options)
        with compile_context():
            return self._compiled(*args, **kwargs)

    def __deepcopy__(self, memo):
        return CompiledForward(self.name, dict(self.options))

    def __getstate__(self):
        return {**self.__dict__, '_compiled': None}


STATIC_USER_KERNELS = 'static_launch_user_defined_triton_kernels'
STATIC_USER_KERNELS_ENV = 'TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS'


def static_user_kernels_in_compile_workers(name):
    """Make Inductor's compile workers honour ``static_launch_user_defined_triton_kernels``.

    Whether a kernel is launched statically is decided where it is compiled, and Inductor compiles in a pool of
    worker processes, to which it forwards only ``use_static_triton_launcher`` of the options a ``torch.compile``
    call patches in (torch 2.11-2.14, ``async_compile.AsyncCompile.triton``). Asked through ``options`` alone, our
    kernels still went through Triton's Python launcher on the GPU (``benchmarks/profile_step.py --compile``'s
    launcher table, README, twenty-eighth session). The workers read the option from its environment variable when
    they start, and the pool starts at the process's first Inductor compile: so the variable is set here, before
    that, unless the user set it. A pool already running keeps what it started with: then say so."""
    from torch._inductor.async_compile import AsyncCompile

    if STATIC_USER_KERNELS_ENV in os.environ:  # the user's choice, either way
        return
    # The pool is made once, by a cached function (torch 2.11-2.14); a release without that cache is taken as
    # not started, and the variable is set: at worst to no effect.
    cache_info = getattr(AsyncCompile.process_pool, 'cache_info', None)
    pool_started = cache_info is not None and cache_info().currsize > 0
    if pool_started:
        warnings.warn(f'{name}: Inductor\'s compile workers started before this compile without '
                      f'{STATIC_USER_KERNELS_ENV}=1, so they launch its Triton kernels through Triton\'s Python '
                      f'launcher (more host time a launch); set it in the environment to launch them statically')
        return
    os.environ[STATIC_USER_KERNELS_ENV] = '1'


# PyTorch's analysis of which arguments a user-defined Triton launch writes, by release: torch 2.14 names it
# identify_accessed_tensors (reads and writes); older releases identify_mutated_tensors. Both take
# (kernel, kwargs, tma_descriptor_metadata).
_WRITE_ANALYSES = ('identify_accessed_tensors', 'identify_mutated_tensors')
# (kernel id, arguments' key) -> (kernel, analysis result); the kernel kept so that its id is not reused.
_ANALYSED = {}


def _analysis_key(kernel, kwargs, tma_descriptor_metadata):
    """What the analysis's result depends on (the kernel and its arguments), or None where that is not known from
    the arguments alone.

    The analysis compiles the kernel to TTIR for these arguments and walks it: symbolic sizes enter the TTIR as one
    placeholder value, fake tensors (and Inductor's buffers) as fresh tensors of their dtype, every other argument
    (ints, floats, bools, constexprs) as it is, so those are the key. A real tensor's address alignment would
    enter Triton's specialisation, TMA descriptors their metadata: such calls are not cached."""
    import sympy
    from torch._subclasses.fake_tensor import is_fake
    from triton.runtime.autotuner import Autotuner

    if tma_descriptor_metadata:
        return None
    if isinstance(kernel, Autotuner):
        # Inductor's lowering passes each launch site's kernel in an autotuner of its own; the analysis takes the
        # kernel inside and the first config's arguments, so those are the key.
        if kernel.configs:
            kwargs = {**kwargs, **kernel.configs[0].kwargs}
        kernel = kernel.fn
    items = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            items.append((name, 'symbolic'))
        elif isinstance(value, torch.Tensor):
            if not is_fake(value):
                return None
            items.append((name, 'tensor', value.dtype))
        elif hasattr(value, 'get_dtype'):  # an Inductor buffer (TensorBox)
            items.append((name, 'tensor', value.get_dtype()))
        elif value is None or isinstance(value, (bool, int, float, str)):
            items.append((name, type(value).__name__, value))
        else:
            return None
    return id(kernel), tuple(items)


def _memoized(analysis):
    def memoized(kernel, kwargs, *args, **kw):
        # Keyed only in the call form this code knows, (kernel, kwargs, tma_descriptor_metadata); any other passes.
        key = _analysis_key(kernel, kwargs, args[0]) if len(args) == 1 and not kw else None
        if key is None:
            return analysis(kernel, kwargs, *args, **kw)
        if key not in _ANALYSED:
            _ANALYSED[key] = kernel, analysis(kernel, kwargs, *args)  # the kernel kept: its id stays its own
        return copy.deepcopy(_ANALYSED[key][1])  # the callers' own copy, as an uncached call gives them

    memoized.memoizes = analysis
    return memoized


@contextlib.contextmanager
def compile_context():
    """While a compiled forward runs (and compiles, when Dynamo decides to): module floats traced as constants,
    PyTorch's write analysis of user-defined Triton launches done once per kernel and arguments' key, and the
    backward compiled with the forward.

    Floats: with ``dynamic=True`` Dynamo traces every float attribute of a module (each norm's ``eps``, each
    block's ``drop_path`` rate, BatchNorm's ``momentum``) as a symbolic input. Where one reaches an op that takes
    a plain float (our ops' ``eps``, ``F.batch_norm``'s) it is specialised, and PyTorch then restarts the whole
    analysis with those floats constant: GroupMamba-T's first training step traced the backbone twice (CPU,
    ``aot_eager``: 84 s against 46 with the floats constant; a Mask R-CNN run on an H100 was four minutes in
    when its second trace reached Inductor). No size depends on these values, so they are traced as constants
    (``specialize_float``) from the start; Dynamo guards on their values as on any constant.

    PyTorch analyses each launch of a user-defined Triton kernel anew at every launch site and for every consumer
    (functionalization and two places in Inductor's lowering), compiling the kernel to TTIR each time, with no
    cache (pytorch/pytorch#193227 proposes one): for GroupMamba-T's det step 1367 analyses of 96 distinct kernels
    and arguments, 40 % of the compile on this project's CPU check (README, fourteenth session). The result is a
    pure function of :func:`_analysis_key`, so it is kept by that key, within this context only (PyTorch's
    function is restored on exit, and a release without it is left alone). The backward is lowered with the
    forward (``force_non_lazy_backward_lowering``, where the release has it) so that its analyses fall inside the
    context too; AOTAutograd otherwise lowers it at the first backward, outside any code of ours.

    Sizes: Dynamo's duck sizing gives equal sizes one symbol, so a square first input (height == width) compiled
    a graph guarded on ``H == W`` and the next non-square input compiled another (CPU, README thirty-ninth
    session). No op here needs the two equal: each size gets its own symbol (``use_duck_shape`` off)."""
    from torch._dynamo import config as dynamo_config
    from torch._functorch import config as functorch_config
    from torch._higher_order_ops import triton_kernel_wrap
    from torch.fx.experimental import _config as shape_config

    name = next((n for n in _WRITE_ANALYSES if hasattr(triton_kernel_wrap, n)), None)
    original = getattr(triton_kernel_wrap, name) if name else None
    with contextlib.ExitStack() as stack:
        # Set and restored by hand: a config's patch() costs about 17 us a call here, this 2. A release without
        # the setting is left alone.
        for config, setting, value in ((dynamo_config, 'specialize_float', True),
                                       (functorch_config, 'force_non_lazy_backward_lowering', True),
                                       (shape_config, 'use_duck_shape', False)):
            if hasattr(config, setting):
                stack.callback(setattr, config, setting, getattr(config, setting))
                setattr(config, setting, value)
        if original is not None and not hasattr(original, 'memoizes'):
            setattr(triton_kernel_wrap, name, _memoized(original))
            stack.callback(setattr, triton_kernel_wrap, name, original)
        yield

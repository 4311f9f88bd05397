"""A module's forward (and its backward) replayed from CUDA graphs, one pair of graphs per input signature.

Why: a GroupMamba training step launches thousands of kernels, and the host takes several times longer to
issue them than the GPU takes to run them (``benchmarks/profile_step.py``; figures in the README's Speed
section). A replayed graph issues them all in one call. The
graphs are recorded per input signature (shape, dtype, autocast dtype, grad mode, module modes, parameters),
so they suit inputs of a few fixed sizes: classification, segmentation crops, fixed-size detection.

How it stays correct:

* Graphs are recorded after two eager warm-up passes on a side stream (Triton compiles, cuDNN picks its
  algorithms); the BatchNorm statistics those passes move, and the CUDA generator's state they advance, are
  put back.
* Autocast's weight-cast cache is off while recording: a cached cast would be baked into the graph and go
  stale after the first optimizer step.
* Every replay copies the input in and returns fresh copies of the outputs, and parameter gradients come
  out of one fresh buffer per dtype; nothing handed out aliases graph memory that a later replay rewrites.
* All graphs of one module share one memory pool. Sharing is safe as long as no other replay runs between a
  graphed forward and its backward, which reads the activations saved in the pool. So a forward whose
  predecessor's backward has not run yet (and whose autograd graph is still alive) runs eagerly instead,
  and a backward whose activations a later replay overwrote raises.
* At most ``MAX_SIGNATURES`` signatures are recorded (each keeps its static tensors); inputs of further
  signatures run eagerly. Every recording, and the first eager fallback of each kind, is logged.
"""
import contextlib
import gc
import weakref

import torch
from mmengine.logging import print_log

MAX_SIGNATURES = 16  # e.g. 7 padded detection training sizes, and test sizes
WARMUP_PASSES = 2


@contextlib.contextmanager
def _autocast_without_cache(device_type):
    enabled = torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), enabled=enabled,
                        cache_enabled=False):
        yield


@contextlib.contextmanager
def _garbage_collected_first():
    """Collect garbage now and keep Python's collector off until the block ends.

    A CUDA graph destroyed while another is being captured frees device memory mid-capture, which invalidates
    that capture (seen on an H100: an earlier model's graphs, dead in a reference cycle, were collected during
    a backward capture). torch >= 2.10 no longer collects garbage before a capture, so it is done here.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _RecordedCall:
    """The graphs of one signature and the static tensors they read and write."""

    def __init__(self, forward, x, params, pool, grad_buffers):
        self.params = params  # the parameters that get gradients (empty without grad)
        self.static_input = x.detach().clone()
        with _autocast_without_cache(x.device.type):
            self.forward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode='thread_local'):
                outputs = forward(self.static_input)
        if not isinstance(outputs, (tuple, list)):
            raise TypeError(f'CUDA graphs: the forward must return a tuple or list of tensors, got {type(outputs)}')
        self.differentiable = [o.requires_grad for o in outputs]
        self.static_outputs = [o.detach() for o in outputs]
        self.backward_graph = None
        if not any(self.differentiable):
            self.params = []  # e.g. only frozen stages' outputs are returned: nothing to differentiate
        if self.params:
            self._record_backward(outputs, pool, grad_buffers)

    def _record_backward(self, outputs, pool, grad_buffers):
        outputs = [o for o in outputs if o.requires_grad]
        self.static_grad_outputs = [torch.empty_like(o) for o in outputs]
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode='thread_local'):
            grads = torch.autograd.grad(outputs, self.params, self.static_grad_outputs, allow_unused=True)
            # Gradients land in one flat buffer per dtype, so that handing them out is one copy per dtype. The
            # buffers live outside the pool and are shared by all signatures: each replay's are copied out
            # before any other replay runs.
            self.grad_layout = []  # (flat buffer, [(param index, numel, shape)]) per dtype
            for dtype in dict.fromkeys(g.dtype for g in grads if g is not None):
                members = [(i, g) for i, g in enumerate(grads) if g is not None and g.dtype == dtype]
                flat = grad_buffers[dtype][:sum(g.numel() for _, g in members)]
                torch.cat([g.reshape(-1) for _, g in members], out=flat)
                self.grad_layout.append((flat, [(i, g.numel(), g.shape) for i, g in members]))

    def param_grads(self):
        """Fresh copies of the last backward replay's parameter gradients (None where a parameter got none)."""
        grads = [None] * len(self.params)
        for flat, members in self.grad_layout:
            pieces = flat.clone().split([numel for _, numel, _ in members])
            for (i, _, shape), piece in zip(members, pieces):
                grads[i] = piece.view(shape)
        return grads


class _ReplayFunction(torch.autograd.Function):
    """Replays a recorded forward; its backward replays the recorded backward."""

    @staticmethod
    def forward(ctx, graphs, recorded, x, *params):
        recorded.static_input.copy_(x)
        recorded.forward_graph.replay()
        outputs = tuple(o.clone() for o in recorded.static_outputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outputs, recorded.differentiable) if not d))
        ctx.graphs, ctx.recorded, ctx.replay = graphs, recorded, graphs.replays
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        graphs, recorded = ctx.graphs, ctx.recorded
        if graphs.replays != ctx.replay:
            raise RuntimeError('CUDA graphs: backward through a graphed forward after a later graphed forward '
                               'overwrote its saved activations (e.g. backward with retain_graph=True after '
                               'another forward); run such code with cuda_graph=False')
        # static_grad_outputs has one buffer per differentiable output (frozen stages give others).
        grads = [grad for grad, differentiable in zip(grad_outputs, recorded.differentiable) if differentiable]
        for static, grad in zip(recorded.static_grad_outputs, grads):
            static.copy_(grad)
        recorded.backward_graph.replay()
        graphs.pending = None
        return (None, None, None, *recorded.param_grads())


class CudaGraphs:
    """Records and replays ``forward(x)`` of ``module`` (returning a tuple or list of tensors; replays return
    a tuple) as CUDA graphs.

    Not an ``nn.Module``: it holds no state worth saving, and copies of the module (``deepcopy`` for EMA,
    pickling) start with no graphs. Call :meth:`clear` when the module's tensors move (``_apply``).
    """

    def __init__(self, name):
        self.name = name
        self.clear()

    def clear(self):
        self.recorded = {}
        self.pool = None
        self.pending = None  # weakref to the autograd context of a forward whose backward has not run
        self.replays = 0
        self.warned = set()
        self.grad_buffers = {}  # dtype -> flat gradient buffer shared by all signatures
        # The module's parameters and submodules below it, listed once (walking them at every call would cost
        # the host as much as a few kernel launches). The module
        # itself is left out: holding it would put the module in a reference cycle, and its graphs would
        # outlive it until a garbage collection.
        self.members = None

    def __deepcopy__(self, memo):
        return CudaGraphs(self.name)

    def __getstate__(self):
        return {'name': self.name}

    def __setstate__(self, state):
        self.__init__(state['name'])

    def _eager(self, forward, x, reason):
        if reason not in self.warned:
            self.warned.add(reason)
            print_log(f'{self.name}: running eagerly, without CUDA graphs: {reason} (logged once)', logger='current',
                      level=30)
        return forward(x)

    def __call__(self, module, forward, x):
        if self.members is None:
            self.members = (list(module.parameters()), list(module.modules())[1:])
        params, submodules = self.members
        if not x.is_cuda:
            return self._eager(forward, x, f'the input is on {x.device.type}, CUDA graphs need CUDA tensors')
        if self.pending is not None and self.pending() is not None:
            return self._eager(forward, x, 'a graphed forward is still waiting for its backward (two forwards '
                                           'before one backward, or a forward whose result was kept unused)')
        if x.requires_grad:
            return self._eager(forward, x, 'the input requires grad, the graphs give gradients to parameters only')
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        device = x.device.type
        signature = (tuple(x.shape), x.dtype, x.device, needs_grad, torch.is_inference_mode_enabled(),
                     torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device),
                     module.training, tuple(m.training for m in submodules),
                     tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in params))
        recorded = self.recorded.get(signature)
        if recorded is None:
            if len(self.recorded) >= MAX_SIGNATURES:
                return self._eager(forward, x, f'{MAX_SIGNATURES} input signatures are recorded already (a new '
                                               f'one: {tuple(x.shape)})')
            recorded = self._record(module, forward, x, [p for p in params if p.requires_grad] if needs_grad else [])
            self.recorded[signature] = recorded
        self.replays += 1
        if not recorded.params:
            recorded.static_input.copy_(x)
            recorded.forward_graph.replay()
            return tuple(o.clone() for o in recorded.static_outputs)
        outputs = _ReplayFunction.apply(self, recorded, x, *recorded.params)
        self.pending = weakref.ref(outputs[recorded.differentiable.index(True)].grad_fn)
        return outputs

    def _record(self, module, forward, x, params):
        print_log(f'{self.name}: recording CUDA graphs for input {tuple(x.shape)} {x.dtype}'
                  f'{" with backward" if params else ""} ({len(self.recorded) + 1} of at most {MAX_SIGNATURES})',
                  logger='current')
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # The warm-up passes must not count as training: put the BatchNorm statistics back afterwards, and the
        # CUDA generator too (they draw stochastic-depth masks). Recording then leaves the random stream as it
        # found it, so the first replay draws what an eager pass would, and a resumed run, which records again
        # at its first iteration, draws what the uninterrupted run drew.
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        rng_state = torch.cuda.get_rng_state(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), _autocast_without_cache(x.device.type):
            for _ in range(WARMUP_PASSES):
                outputs = [o for o in forward(x) if o.requires_grad]
                if params and outputs:
                    torch.autograd.grad(outputs, params, [torch.ones_like(o) for o in outputs], allow_unused=True)
                del outputs
        torch.cuda.current_stream(x.device).wait_stream(side)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.cuda.set_rng_state(rng_state, x.device)
        for dtype in {p.dtype for p in params}:
            if dtype not in self.grad_buffers:  # room for every parameter of that dtype, whichever get gradients
                numel = sum(p.numel() for p in self.members[0] if p.dtype == dtype)
                self.grad_buffers[dtype] = torch.empty(numel, dtype=dtype, device=x.device)
        try:
            with _garbage_collected_first():
                return _RecordedCall(forward, x, params, self.pool, self.grad_buffers)
        except RuntimeError as error:
            raise RuntimeError(f'{self.name}: recording CUDA graphs for input {tuple(x.shape)} failed (an op that '
                               f'cannot be captured, e.g. a host sync?); cuda_graph=False runs eagerly') from error

"""Kernel launches of a GroupMamba training step, counted on the CPU (issue #14: the eager step is host-bound).

    python benchmarks/launch_count.py [--dims 96] [--size 16] [--sms 132] [--arch mini]

Counts, for one GroupMambaBlock (train mode, drop_path > 0, input requiring grad) forward and backward, fp32
and under autocast (CPU bf16 standing in for CUDA fp16), the operations that would launch a GPU kernel, by op
name; then the same totals for the whole backbone of ``--arch``. The Triton path runs through Triton's
interpreter (``TRITON_INTERPRET=1``, ``MMGM_KERNELS=triton``, set here before Triton is imported), so that the
glue inside the fused custom ops (allocations aside: reductions, casts, copies) is counted too:

* a ``TorchDispatchMode`` sees every ATen op that reaches the dispatcher; view and metadata ops (any op whose
  output aliases its input) and allocations without a kernel (``empty*``) are not counted;
* an ``mmgroupmamba::`` custom op is not counted itself: its Python implementation runs with the mode
  re-entered, so the ops inside it are (the dispatcher switches modes off inside an op);
* every Triton launch counts once, as ``triton:<kernel>``; the interpreter's own host copies are not seen.

An ATen op counts as one launch, and as two where CUDA runs it as a zero fill and a copy (``eye``,
``diag_embed``, ``select_backward``, ``slice_backward``); a matmul may launch more (cuBLAS split-K). CPU and
CUDA autocast cast the same ops. ``--sms`` is the multiprocessor count the launchers size their tilings by
(132: an H200), which decides whether a scan splits its sequence (two launches more each way); ``--size`` must
be long enough for that to happen (16: 256 positions).
"""
import argparse
import collections
import contextlib
import os

os.environ.setdefault('TRITON_INTERPRET', '1')  # must precede Triton's first import
os.environ['MMGM_KERNELS'] = 'triton'

import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from mmgroupmamba import GroupMamba  # noqa: E402
from mmgroupmamba.kernels import dispatch  # noqa: E402
from mmgroupmamba.kernels.layout import CHANNEL_MULTIPLE, stored_channels  # noqa: E402
from mmgroupmamba.kernels.ops_util import launchable  # noqa: E402
from mmgroupmamba.models.groupmamba import GroupMambaBlock  # noqa: E402

# Allocations: no kernel, and what they return holds nothing yet (a kernel it is passed to writes it).
ALLOCATIONS = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided'}
# Ops that launch nothing although their output is no view: allocations, and a reshape's copy-free result.
NO_KERNEL = ALLOCATIONS | {'_unsafe_view'}
# ATen ops that run as a zero fill and a copy on CUDA: two kernels.
TWO_KERNELS = {'eye', 'diag_embed', 'select_backward', 'slice_backward'}
# In-place ops that overwrite their first argument without reading it.
OVERWRITES_SELF = {'zero_', 'fill_', 'copy_', 'bernoulli_', 'normal_', 'uniform_'}
LAUNCHERS = ('triton_scan', 'triton_gated_norm', 'triton_dwconv', 'triton_affinity')
NAMESPACE = 'mmgroupmamba'


def storage_key(t):
    """The address of the memory ``t`` views: tensors (and views) that share it share this key."""
    return t.untyped_storage().data_ptr()


def tensors_in(values):
    """The tensors among ``values`` (nested lists, tuples and dicts included), each once, in order."""
    seen, found = set(), []
    for value in torch.utils._pytree.tree_leaves(values):
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            found.append(value)
    return found


class LaunchWalker(TorchDispatchMode):
    """Calls ``launch(name, reads, writes, kernels)`` for every op that would launch a GPU kernel and every
    Triton launch, with ``phase`` (``'forward'``, then what the caller sets) telling where the step is.

    ``reads`` and ``writes`` are the tensors the launch reads and writes as far as can be told from outside it:

    * an ATen op reads its tensor arguments (none for a ``*_like``/``new_*`` factory, whose argument gives only
      a shape; not the first for :data:`OVERWRITES_SELF`) and writes the tensors it returns;
    * a Triton kernel writes those of its tensor arguments that were allocated (:data:`ALLOCATIONS`) and not
      written since, i.e. the outputs its launcher made for it, and reads the others: a kernel that also writes
      an argument that held data (accumulates into it) is taken to read it only.
    """

    def __init__(self):
        super().__init__()
        self.phase = 'forward'
        self._unwritten = set()  # storage keys of allocations that no launch has written yet

    def launch(self, name, reads, writes, kernels):
        """Called for each launch; ``kernels``: how many GPU kernels it is (2 for :data:`TWO_KERNELS`)."""
        raise NotImplementedError

    def unwritten(self, t):
        """Whether ``t``'s memory was allocated and no launch has written it yet: it holds no data."""
        return storage_key(t) in self._unwritten

    def _record(self, name, reads, writes, kernels):
        self.launch(name, reads, writes, kernels)
        self._unwritten.difference_update(storage_key(t) for t in writes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NAMESPACE:
            with self:  # the implementation's own ops and launches are what runs on the device
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ALLOCATIONS:
            self._unwritten.update(storage_key(t) for t in tensors_in(out))
        makes_tensor = any(isinstance(r.type, torch.TensorType) for r in func._schema.returns)
        if makes_tensor and not (func.is_view or name in NO_KERNEL):
            if name.endswith('_like') or name.startswith('new_'):
                reads = []
            else:
                reads = tensors_in((args[1:] if name in OVERWRITES_SELF else args, kwargs))
            self._record(name, reads, tensors_in(out), 2 if name in TWO_KERNELS else 1)
        return out

    @contextlib.contextmanager
    def triton_launches(self, modules, run=True):
        """Walks the launches of ``modules``' ``launchable(kernel)[grid](...)`` calls while active; ``run``:
        whether the kernels then run (through the interpreter). Left out, their outputs hold no data, which no
        shape and hence no later launch depends on: the walk is the same, in seconds instead of minutes."""
        walker = self

        class Walked:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    name = getattr(self.kernel, 'fn', self.kernel).__name__
                    reads, writes, keys = [], [], set()
                    for t in tensors_in((args, kwargs)):
                        if storage_key(t) not in keys:  # one buffer passed twice (an output that is optional)
                            keys.add(storage_key(t))
                            (writes if walker.unwritten(t) else reads).append(t)
                    walker._record(f'triton:{name}', reads, writes, 1)
                    if not run:
                        return None
                    with _disable_current_modes():  # the interpreter's host copies are no device work
                        return launchable(self.kernel)[grid](*args, **kwargs)

                return launch

        for module in modules:
            if module.launchable is not launchable:
                raise RuntimeError(f'{module.__name__}.launchable is not ops_util.launchable: its launches would '
                                   'not be walked')
            module.launchable = Walked
        try:
            yield
        finally:
            for module in modules:
                module.launchable = launchable


class LaunchCounter(LaunchWalker):
    """Counts launch-like ops and Triton launches into ``counts[(phase, name)]``."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def launch(self, name, reads, writes, kernels):
        self.counts[self.phase, name] += kernels


def walk_step(walker, module, x, autocast, forward_context=contextlib.nullcontext(), run_kernels=True):
    """Runs ``module(x)`` (inside ``forward_context``) and its backward under ``walker``, as a training step
    does (no gradient accumulated from an earlier step), the Triton kernels too unless ``run_kernels`` is
    false (:meth:`LaunchWalker.triton_launches`); returns the outputs."""
    module.zero_grad(set_to_none=True)  # as a training step's optimizer leaves them: no accumulation
    x.grad = None
    launchers = [dispatch.triton_module(name, x.device) for name in LAUNCHERS]
    with walker.triton_launches(launchers, run_kernels), walker:
        with forward_context, torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        outs = (out, ) if isinstance(out, torch.Tensor) else out
        walker.phase = 'backward'
        with _disable_current_modes():  # the loss's gradients are no part of the step walked
            grads = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
    return outs


def walk_inference(walker, module, x, autocast, run_kernels=True):
    """Runs one eager inference forward of ``module(x)`` (no gradient; put the module in eval mode first) under
    ``walker``, the Triton kernels too unless ``run_kernels`` is false; returns the output. Call it twice to walk
    a later forward: the first builds the weights that later ones reuse (``train()``/``eval()`` drops them)."""
    launchers = [dispatch.triton_module(name, x.device) for name in LAUNCHERS]
    with walker.triton_launches(launchers, run_kernels), walker, torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return module(x)


def count_step(module, x, autocast):
    """Launch counts of ``module(x)`` and of its backward, keyed by ``(phase, op name)``."""
    counter = LaunchCounter()
    walk_step(counter, module, x, autocast)
    return counter.counts


def count_inference(module, x, autocast, calls=2):
    """Launch counts of ``calls`` eager inference forwards of ``module(x)`` (eval, no gradient), one total per
    call: the first builds the blocks' matmul weights, later ones reuse them (GroupMambaBlock._forward_weights)."""
    module.eval()
    totals = []
    for _ in range(calls):
        counter = LaunchCounter()
        walk_inference(counter, module, x, autocast, run_kernels=False)
        totals.append(sum(counter.counts.values()))
    return totals


def size_tilings_for(sms):
    """Makes the launchers size their tilings for ``sms`` multiprocessors, as on a GPU that has them."""
    dispatch.multiprocessors = lambda device, interpreted=1: sms
    for name in LAUNCHERS:  # the launchers imported it by name
        module = dispatch.triton_module(name, torch.device('cpu'))
        if hasattr(module, 'multiprocessors'):
            module.multiprocessors = dispatch.multiprocessors


def print_table(columns):
    """``columns``: {header: counts}; one row per op, forward ops first, then backward ones."""
    keys = sorted({k for counts in columns.values() for k in counts})
    print('| phase | op | ' + ' | '.join(columns) + ' |')
    print('| --- | --- |' + ' --- |' * len(columns))
    for phase in ('forward', 'backward'):
        for _, name in (k for k in keys if k[0] == phase):
            print(f'| {phase} | {name} | ' + ' | '.join(str(c.get((phase, name), 0)) for c in columns.values()) + ' |')
        totals = [sum(n for (p, _), n in c.items() if p == phase) for c in columns.values()]
        print(f'| **{phase}** | **total** | ' + ' | '.join(f'**{t}**' for t in totals) + ' |')
    print('| **both** | **total** | ' + ' | '.join(f'**{sum(c.values())}**' for c in columns.values()) + ' |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dims', type=int, default=96, help="the block's channels")
    parser.add_argument('--size', type=int, default=16, help='height and width of the map (batch 1)')
    parser.add_argument('--sms', type=int, default=132, help='multiprocessors the tilings are sized for')
    parser.add_argument('--arch', default='mini', help="backbone counted in total ('' for none)")
    parser.add_argument('--channel-multiple', type=int, default=CHANNEL_MULTIPLE,
                        help="GroupMamba's channel_multiple: a block of --dims channels not a multiple of it is "
                        'stored padded (kernels/layout.py); 1: never')
    args = parser.parse_args()
    sms = args.sms
    size_tilings_for(sms)

    torch.manual_seed(0)
    stored = stored_channels(args.dims, args.channel_multiple)
    block = GroupMambaBlock(args.dims, 4, drop_path=0.1, stored_dims=stored).train()
    x = torch.randn(1, args.size, args.size, stored, requires_grad=True)
    columns = {f'{"bf16 autocast" if amp else "fp32"}': count_step(block, x, amp) for amp in (False, True)}
    print(f'launch-like ops of one GroupMambaBlock ({args.dims} channels stored as {stored}, 1x{args.size}x'
          f'{args.size}, train, drop_path 0.1, Triton path, tilings for {sms} SMs)\n')
    print_table(columns)
    if args.arch:
        model = GroupMamba(arch=args.arch, drop_path_rate=0.1, channel_multiple=args.channel_multiple).train()
        image = torch.randn(1, 3, 4 * args.size, 4 * args.size)
        blocks = sum(model.arch['depths'])
        print(f'\nbackbone {args.arch!r} ({blocks} blocks), 1x3x{4 * args.size}x{4 * args.size}, all four outputs\n')
        print('| | forward | backward | both | both / blocks |')
        print('| --- | --- | --- | --- | --- |')
        for amp in (False, True):
            counts = count_step(model, image, amp)
            fwd = sum(n for (p, _), n in counts.items() if p == 'forward')
            both = sum(counts.values())
            print(f'| {"bf16 autocast" if amp else "fp32"} | {fwd} | {both - fwd} | {both} | {both / blocks:.1f} |')
        first, later = count_inference(model, image, True)
        print(f'\neager inference (eval, no gradient, bf16 autocast): {first} launches in the first forward, {later} '
              'in each later one (the blocks\' casts and block-diagonal projections kept)')


if __name__ == '__main__':
    main()

"""Which implementation a fused op runs (Triton or the PyTorch reference) and the device facts the Triton
launchers size their tilings by. Every op module imports this one; nothing here imports an op module.
"""
import functools
import importlib
import os

import torch

IMPL_ENV = 'MMGM_KERNELS'
# The variable's first name, from when it switched the scan alone; still honoured.
LEGACY_IMPL_ENV = 'MMGM_SCAN_IMPL'
IMPLS = ('auto', 'triton', 'reference')


def kernel_impl():
    """``MMGM_KERNELS`` (or its old name ``MMGM_SCAN_IMPL``), read at every call so that tests and users can
    switch implementations at run time: ``auto`` (Triton on CUDA tensors, the reference elsewhere),
    ``triton`` (also on CPU tensors, through Triton's interpreter) or ``reference``."""
    name = IMPL_ENV if IMPL_ENV in os.environ else LEGACY_IMPL_ENV
    impl = os.environ.get(name, 'auto').strip().lower() or 'auto'
    if impl not in IMPLS:
        raise ValueError(f'{name}={impl!r} is not one of {", ".join(IMPLS)}')
    return impl


def use_triton(tensor):
    """Whether a fused op runs its Triton kernels for ``tensor``.

    Raises if Triton is asked for where it cannot run (CPU tensors without the interpreter).
    """
    impl = kernel_impl()
    if impl == 'triton' or (impl == 'auto' and tensor.is_cuda):
        require_triton_runnable(tensor.device)
        return True
    return False


def interpreter_requested():
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def require_triton_runnable(device):
    """Triton kernels run on CUDA devices, or on the CPU in the Triton interpreter only."""
    if device.type != 'cuda' and not interpreter_requested():
        raise RuntimeError(
            f'{IMPL_ENV}=triton was asked for with {device.type} tensors: the Triton kernels run on CPU only '
            'in the Triton interpreter; set TRITON_INTERPRET=1 before Triton is first imported.')


def triton_module(name, device):
    """The Triton launcher module ``mmgroupmamba.kernels.<name>``, imported on first use.

    Importing mmgroupmamba.kernels must not need Triton, and Triton binds its interpreter
    (``TRITON_INTERPRET=1``) when the kernels are defined, i.e. at this import.
    """
    require_triton_runnable(device)
    module = _import_launcher(name)
    if device.type != 'cuda' and not kernels_interpreted(module):
        raise RuntimeError(
            f'TRITON_INTERPRET=1 was set after {module.__name__} had been imported, so its kernels were '
            'compiled for the GPU; set it before the first import to run them on the CPU.')
    return module


@functools.lru_cache(maxsize=None)  # asked at every op call: the module is looked up once
def _import_launcher(name):
    return importlib.import_module(f'{__package__}.{name}')


def kernels_interpreted(module):
    """Whether a launcher module's kernels were defined under Triton's interpreter (they then run on CPU)."""
    import triton
    return not isinstance(module.KERNEL, triton.runtime.jit.JITFunction)


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device, interpreted=1):
    """Multiprocessor count of a CUDA device, which the kernels' tilings are sized for; ``interpreted`` for
    CPU tensors (Triton's interpreter). Looked up once per device: the launchers ask at every call, and their
    host time is on a training step's critical path.
    """
    if device.type != 'cuda':
        return interpreted
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())

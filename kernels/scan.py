"""The scan op that GroupMamba layers call: Triton kernels on CUDA tensors, the PyTorch reference elsewhere."""
import functools
import os

import torch

from .reference import selective_scan_reference

IMPL_ENV = 'MMGM_SCAN_IMPL'
IMPLS = ('auto', 'triton', 'reference')


def _scan_impl():
    # Read at every call (not at import) so that tests and users can switch implementations at run time.
    impl = os.environ.get(IMPL_ENV, 'auto').strip().lower() or 'auto'
    if impl not in IMPLS:
        raise ValueError(f'{IMPL_ENV}={impl!r} is not one of {", ".join(IMPLS)}')
    return impl


def use_triton(tensor):
    """Whether a fused op runs its Triton kernels for ``tensor``, per ``MMGM_SCAN_IMPL`` (read at every call).

    Raises if Triton is asked for where it cannot run (CPU tensors without the interpreter).
    """
    impl = _scan_impl()
    if impl == 'triton' or (impl == 'auto' and tensor.is_cuda):
        require_triton_runnable(tensor.device)
        return True
    return False


def require_triton_runnable(device):
    """Triton kernels run on CUDA devices, or on the CPU in the Triton interpreter only."""
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET', '0') in ('', '0'):
        raise RuntimeError(
            f'{IMPL_ENV}=triton was asked for with {device.type} tensors: the Triton kernels run on CPU only '
            'in the Triton interpreter; set TRITON_INTERPRET=1 before Triton is first imported.')


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device, interpreted=1):
    """Multiprocessor count of a CUDA device, which the kernels' tilings are sized for; ``interpreted`` for
    CPU tensors (Triton's interpreter). Looked up once per device: the query costs tens of µs, at every launch.
    """
    if device.type != 'cuda':
        return interpreted
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _triton_module(device):
    # Imported on first use: importing mmgroupmamba.kernels must not need Triton, and the interpreter
    # (TRITON_INTERPRET=1) is chosen by Triton when the kernels are defined, i.e. at this import.
    require_triton_runnable(device)
    from . import triton_scan
    if device.type != 'cuda' and not triton_scan.kernels_interpreted():
        raise RuntimeError(
            'TRITON_INTERPRET=1 was set after mmgroupmamba.kernels.triton_scan had been imported, so its '
            'kernels were compiled for the GPU; set it before the first import to run them on the CPU.')
    return triton_scan


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper of the Triton scan; the backward recomputes states from per-tile checkpoints."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, u, delta, A, B, C, D, delta_bias, hw, tiling):
        ts = _triton_module(u.device)
        # The kernels index contiguous channels-last tensors and accumulate in fp32 whatever the dtypes
        # (autocast may hand over bf16 activations with fp32 parameters; each is read in its own dtype).
        u, delta = u.contiguous(), delta.contiguous()
        B, C = _shared_row_layout(B, C)
        A, D, delta_bias = (t.contiguous() for t in (A, D, delta_bias))
        cfg = ts.choose_config(u, **tiling)
        save = any(ctx.needs_input_grad[:7])
        y, states = ts.scan_forward(u, delta, A, B, C, D, delta_bias, hw, cfg, save_states=save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
            ctx.hw, ctx.cfg = hw, cfg
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, dy):
        ts = _triton_module(dy.device)
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = ts.scan_backward(dy, u, delta, A, B, C, D, delta_bias, ctx.hw, states, ctx.cfg)
        return (*grads, None, None)


def _shared_row_layout(B, C):
    """``B`` and ``C`` as the kernels read them: rows of unit-stride groups, one row stride for both.

    The layer computes them in one projection and splits it, so they usually are two column slices of one
    ``(batch, L, 2 * groups)`` tensor: read in place, without the two copies ``.contiguous()`` would make.
    """
    def readable(t):
        return t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1)

    if B.stride() == C.stride() and readable(B):
        return B, C
    return B.contiguous(), C.contiguous()


def selective_scan_triton(u, delta, A, B, C, D, delta_bias, hw, chunk_len=None, block_t=None, block_c=None,
                          num_warps=None):
    """The Triton scan with explicit tiling (``chunk_len`` forces the sequence split; see triton_scan)."""
    _check_shapes(u, delta, A, B, C, D, delta_bias, hw)
    tiling = dict(chunk_len=chunk_len, block_t=block_t, block_c=block_c, num_warps=num_warps)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, delta_bias, tuple(hw), tiling)


def _check_shapes(u, delta, A, B, C, D, delta_bias, hw):
    batch, length, channels = u.shape
    groups = B.shape[-1]
    if hw[0] * hw[1] != length:
        raise ValueError(f'hw={tuple(hw)} does not match {length} positions')
    if groups != 4 or channels % groups:
        raise ValueError(f'expected 4 channel groups dividing {channels} channels, got B of shape {tuple(B.shape)}')
    if delta.shape != u.shape or B.shape != C.shape or B.shape[:2] != (batch, length):
        raise ValueError('u/delta must be (batch, H*W, channels) and B/C (batch, H*W, 4)')
    for name, t in (('A', A), ('D', D), ('delta_bias', delta_bias)):
        if t.shape != (channels,):
            raise ValueError(f'{name} must have shape ({channels},), got {tuple(t.shape)}')


def selective_scan(u, delta, A, B, C, D, delta_bias, hw):
    """Selective scan of all channel groups of one GroupMamba layer, each in its own direction.

    Tensors are channels-last, positions in row-major order, as the layer's linear layers produce them:

    Args:
        u (Tensor): ``(batch, H*W, channels)`` scan input; channels are ``groups`` equal groups.
        delta (Tensor): ``(batch, H*W, channels)`` step sizes before ``softplus(delta + delta_bias)``.
        A (Tensor): ``(channels,)`` state decay rates (negative: ``-exp(A_logs)``).
        B (Tensor): ``(batch, H*W, groups)`` input projection of each group (``d_state=1``).
        C (Tensor): ``(batch, H*W, groups)`` output projection of each group.
        D (Tensor): ``(channels,)`` skip weights.
        delta_bias (Tensor): ``(channels,)``.
        hw (tuple[int, int]): the map's height and width; group ``g`` scans in
            ``SCAN_DIRECTIONS[g]`` order over it.

    Returns:
        Tensor: ``(batch, H*W, channels)`` in ``u``'s dtype, computed in fp32.

    The implementation follows the environment variable ``MMGM_SCAN_IMPL``, read at every call: ``auto``
    (default: Triton for CUDA tensors, the PyTorch reference otherwise), ``triton`` (also on CPU tensors,
    through the Triton interpreter, which needs ``TRITON_INTERPRET=1``) or ``reference``.
    """
    if use_triton(u):
        return selective_scan_triton(u, delta, A, B, C, D, delta_bias, hw)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, hw)

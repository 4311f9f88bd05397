"""Pieces shared by the custom ops' implementations."""
import contextlib

import torch

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)


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
    the output (both contiguous, as the Triton path and the fake implementations give them)."""
    with autograd_inside_op():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        wanted = [t for t in leaves if t is not None]
        found = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype), allow_unused=True))
    grads = []
    for t in leaves:
        g = None if t is None else next(found)
        grads.append(None if t is None else (torch.zeros_like(t) if g is None else g).contiguous())
    return tuple(grads), (out.detach().contiguous() if need_output else None)

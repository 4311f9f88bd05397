"""A dispatch mode that lists the ATen ops run under it, by name (``aten::index_select`` as ``index_select``)."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split('.')[0])
        return func(*args, **(kwargs or {}))

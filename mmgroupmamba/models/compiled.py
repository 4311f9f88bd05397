"""A module's forward run through ``torch.compile``, compiled on first use (the backbones' ``compile`` option)."""
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
            if defaults:
                self.options['options'] = {**defaults, **self.options.get('options', {})}
        self._compiled = None

    def __call__(self, forward, x):
        if self._compiled is None:
            self._compiled = torch.compile(forward, **self.options)
        return self._compiled(x)

    def __deepcopy__(self, memo):
        return CompiledForward(self.name, dict(self.options))

    def __getstate__(self):
        return {**self.__dict__, '_compiled': None}

"""Any model's backbone run through ``torch.compile`` inside a stock training run, the way GroupMamba's own
``compile`` option runs it: mmdet's Swin-T compiled like GroupMamba, for comparisons in the same mode."""
import functools

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .models.compiled import CompiledForward


@HOOKS.register_module()
class CompileBackboneHook(Hook):
    """Compiles ``model.backbone``'s forward (only the backbone: mmengine's own ``compile=True`` compiles the
    whole train step, which fails with AMP for mmdet's own configs) with the same :class:`CompiledForward` as
    GroupMamba's ``compile`` option: compiled at its first call, ``dynamic=True`` and ``fullgraph=True`` unless
    ``options`` (``torch.compile`` arguments) say otherwise. Copies of the model (``deepcopy`` for EMA) start
    uncompiled and compile their own forward.

        custom_imports = dict(imports=['mmgroupmamba'])
        custom_hooks = [dict(type='CompileBackboneHook', options=dict(fullgraph=False))]

    For GroupMamba itself use its own option (``model.backbone.compile=True``); both together raise.
    """

    priority = 'VERY_HIGH'

    def __init__(self, options=None):
        self.options = dict(options or {})
        CompiledForward('CompileBackboneHook', self.options)  # the options are checked at build time

    def before_run(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        backbone = getattr(model, 'backbone', None)
        if backbone is None:
            raise AttributeError(f'CompileBackboneHook: {type(model).__name__} has no backbone to compile')
        name = type(backbone).__name__
        if getattr(backbone, '_compiled', None) is not None:
            raise ValueError(f'CompileBackboneHook: {name} is already compiled by its own compile option; '
                             'use one of the two')
        if isinstance(backbone.__dict__.get('forward'), functools.partial):
            raise ValueError(f'CompileBackboneHook: {name} is already compiled by another CompileBackboneHook')
        # A partial of the bound forward, stored on the instance: a deepcopy of the module copies the method
        # bound to the copy and a CompiledForward that starts uncompiled.
        backbone.forward = functools.partial(CompiledForward(name, dict(self.options)), backbone.forward)
        runner.logger.info(f'CompileBackboneHook: {name} runs through torch.compile with '
                           f'{backbone.forward.func.options}')

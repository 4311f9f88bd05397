"""mmgroupmamba: GroupMamba backbones for OpenMMLab (``custom_imports=dict(imports=['mmgroupmamba'])``)."""
from .checkpoint import register_safe_checkpoint_loading
from .compile_hook import CompileBackboneHook
from .environment import check_detection_and_segmentation_imports
from .hooks import RandomStateHook
from .models import GroupMamba
from .optim import MergedGroupsOptimWrapperConstructor
from .runner import PreflightRunner

__version__ = '0.1.0'
__all__ = ['CompileBackboneHook', 'GroupMamba', 'MergedGroupsOptimWrapperConstructor', 'PreflightRunner',
           'RandomStateHook']

# The configs import the plugin before mmdet.models or mmseg.models (nothing above imports them): a package
# combination that breaks those imports is reported here, with the fix, instead of as a TypeError deep inside
# mmpretrain.
check_detection_and_segmentation_imports()

# Importing the plugin is how OpenMMLab tools load it, so this is where mmengine's checkpoint loading is made
# to work under torch's weights_only=True (see mmgroupmamba/checkpoint.py).
register_safe_checkpoint_loading()

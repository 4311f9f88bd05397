"""mmgroupmamba: GroupMamba backbones for OpenMMLab (``custom_imports=dict(imports=['mmgroupmamba'])``)."""
from .checkpoint import register_safe_checkpoint_loading
from .hooks import RandomStateHook
from .models import GroupMamba
from .optim import MergedGroupsOptimWrapperConstructor

__version__ = '0.1.0'
__all__ = ['GroupMamba', 'MergedGroupsOptimWrapperConstructor', 'RandomStateHook']

# Importing the plugin is how OpenMMLab tools load it, so this is where mmengine's checkpoint loading is made
# to work under torch's weights_only=True (see mmgroupmamba/checkpoint.py).
register_safe_checkpoint_loading()

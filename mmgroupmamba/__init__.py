"""mmgroupmamba: GroupMamba backbones for OpenMMLab (``custom_imports=dict(imports=['mmgroupmamba'])``)."""
from .models import GroupMamba

__version__ = '0.1.0'
__all__ = ['GroupMamba']

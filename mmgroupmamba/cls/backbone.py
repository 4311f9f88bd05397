"""``GroupMambaClsBackbone``: the former name of ``GroupMamba(out_type='cls_token')``, kept for its configs and
checkpoints (same arguments and output, same parameter names: ``post_network.0.*`` ...)."""
import logging

from mmengine.logging import print_log
from mmpretrain.registry import MODELS

from mmgroupmamba.models.groupmamba import GroupMamba


@MODELS.register_module()
class GroupMambaClsBackbone(GroupMamba):
    """Deprecated: use ``dict(type='GroupMamba', out_type='cls_token')``, which this is.

    Takes the arguments of :class:`mmgroupmamba.models.GroupMamba` except ``out_type``; logs the replacement
    once per process.
    """

    deprecation_logged = False

    def __init__(self, arch='tiny', **kwargs):
        if 'out_type' in kwargs:
            raise TypeError("GroupMambaClsBackbone: out_type is not an argument (it is 'cls_token'); use "
                            f"type='GroupMamba', out_type={kwargs['out_type']!r}")
        if not GroupMambaClsBackbone.deprecation_logged:
            GroupMambaClsBackbone.deprecation_logged = True
            print_log("GroupMambaClsBackbone is deprecated: write backbone=dict(type='GroupMamba', "
                      "out_type='cls_token', ...) instead (the same model and checkpoint keys)",
                      logger='current', level=logging.WARNING)
        super().__init__(arch=arch, out_type='cls_token', **kwargs)

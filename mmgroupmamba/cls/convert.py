"""Official GroupMamba ImageNet checkpoints -> the mmpretrain classifier's keys.

Official keys are the model's attribute names (``patch_embed1.*``, ``block3.7.attn.mamba_g2.A_logs``,
``norm4.*``, ``post_network.0.*``, ``head.*``, ``dist_head.*``); in the mmpretrain model the first four live
under ``backbone.`` (``GroupMamba(out_type='cls_token')``) and the two heads under ``head.``
(:class:`DistillationLinearClsHead`).
"""
import re
from collections import OrderedDict

# (official key pattern, mmpretrain key replacement); the first match places a key.
KEY_MAP = (
    (r'^((patch_embed|block|norm)[1-4]\.|post_network\.)', r'backbone.\1'),
    (r'^head\.', 'head.head.'),
    (r'^dist_head\.', 'head.dist_head.'),
)
# Where official training checkpoints keep weights, for mmgroupmamba.checkpoint.unwrap_state_dict: the EMA model
# (the one the paper evaluates) first. A released checkpoint is the raw state dict.
WEIGHT_KEYS = ('model_ema', 'model', 'state_dict_ema', 'state_dict')


def convert_official(state_dict):
    """Map official keys to the mmpretrain model's; returns ``(converted, unplaced_keys)``."""
    converted, unplaced = OrderedDict(), []
    for key, value in state_dict.items():
        for pattern, replacement in KEY_MAP:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            unplaced.append(key)
    return converted, unplaced

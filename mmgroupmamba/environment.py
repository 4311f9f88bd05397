"""Package combinations that break the OpenMMLab imports the plugin needs, found before they fail obscurely.

mmpretrain <= 1.2.0 imports its multimodal models whenever transformers >= 4.28 (and pycocotools) are installed.
They subclass transformers 4 classes; transformers 5 removed names they import (e.g.
``transformers.modeling_utils.apply_chunking_to_forward``), mmpretrain's bare ``except`` sets the base class to
None, and ``import mmpretrain.models`` ends in ``TypeError: NoneType takes no arguments``. ``mmdet.models``
imports mmpretrain whenever it is installed (for its ReID models) and ``mmseg.models`` imports ``mmdet.models``
whenever mmdet is installed, so detection and segmentation fail with it. Versions are read from the installed
packages' metadata (as mmpretrain does), without importing them.
"""
from importlib import metadata

from mmengine.utils import digit_version

# The last mmpretrain release, and the one install.sh pins.
LAST_AFFECTED_MMPRETRAIN = '1.2.0'


def _installed_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mmpretrain_transformers_conflict():
    """``None``, or a message saying which imports fail here because of transformers >= 5 and what to do."""
    mmpretrain = _installed_version('mmpretrain')
    transformers = _installed_version('transformers')
    if mmpretrain is None or transformers is None or _installed_version('pycocotools') is None:
        return None
    if digit_version(mmpretrain) > digit_version(LAST_AFFECTED_MMPRETRAIN):
        return None
    if digit_version(transformers) < digit_version('5.0.0'):
        return None
    broken = ['mmpretrain.models']
    if _installed_version('mmdet') is not None:
        broken = ['mmdet.models', 'mmseg.models (it imports mmdet.models)', *broken]
    return (f'mmpretrain {mmpretrain} cannot be imported beside transformers {transformers}: its multimodal models '
            f'subclass transformers 4 classes, and import fails with "TypeError: NoneType takes no arguments". '
            f'mmdet.models imports mmpretrain whenever it is installed, so this breaks {", ".join(broken)}. '
            f'Fix it with one of: `pip install "transformers<5"` (mmpretrain {mmpretrain} is written for '
            f'transformers 4); `pip uninstall transformers` if nothing here needs it (training and testing '
            f'GroupMamba do not); `pip uninstall mmpretrain` if you only detect or segment. '
            f'See README.md, "Install".')


def check_detection_and_segmentation_imports():
    """Raise ``RuntimeError`` with the fix where ``mmdet.models`` and ``mmseg.models`` would fail to import."""
    problem = mmpretrain_transformers_conflict()
    if problem is not None and _installed_version('mmdet') is not None:
        raise RuntimeError(problem)


def check_classification_imports():
    """Raise ``RuntimeError`` with the fix where ``mmpretrain.models`` would fail to import."""
    problem = mmpretrain_transformers_conflict()
    if problem is not None:
        raise RuntimeError(problem)

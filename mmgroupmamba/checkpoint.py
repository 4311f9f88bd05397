"""Checkpoints: mmengine's own files under torch's safe loading, and official GroupMamba weights for a backbone.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means ``weights_only=True``
and mmengine's own checkpoints (resume, ``load_from``, ``mim test --checkpoint``) are refused, because they
pickle a few non-tensor objects. :func:`allow_mmengine_checkpoint_types` allow-lists exactly those, so safe
loading stays on: a file holding anything else is still refused, with a message naming the explicit opt-in
(``python -m mmgroupmamba.checkpoint trust SRC DST``) for a file the user trusts.
"""
import argparse
import os.path as osp
import pickle
from collections import OrderedDict

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

TRUST_COMMAND = 'python -m mmgroupmamba.checkpoint trust SRC DST'

# The statistics functions a HistoryBuffer pickles by reference (``getattr(HistoryBuffer, 'mean')``).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner, name):
    """Stand-in for ``getattr`` while unpickling: resolves only HistoryBuffer's statistics methods.

    A general ``getattr`` would let a pickle walk from any allowed object to arbitrary code.
    """
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(owner, name)
    raise pickle.UnpicklingError(f'getattr({owner!r}, {name!r}) is not something mmengine checkpoints hold')


PLAIN_NUMPY_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
                      'float16', 'float32', 'float64')


def _numpy_core():
    # numpy 2 moved numpy.core to numpy._core; pickles name the module of the numpy that wrote them.
    return getattr(np, '_core', None) or np.core


def allow_mmengine_checkpoint_types():
    """Allow-list, for ``torch.load(weights_only=True)``, exactly what mmengine's Runner writes besides tensors.

    Measured on a Runner checkpoint (``torch.serialization.get_unsafe_globals_in_checkpoint``): the message hub's
    ``HistoryBuffer`` objects (numpy arrays, and their statistics methods looked up with ``getattr``) and numpy
    scalars in its runtime info.
    """
    core = _numpy_core()
    entries = [
        HistoryBuffer,
        (_history_buffer_statistic, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
    ]
    # A checkpoint names the numpy module of the numpy that wrote it: accept both spellings.
    for module_name in {'numpy.core.multiarray', f'{core.__name__}.multiarray'}:
        entries += [(core.multiarray._reconstruct, f'{module_name}._reconstruct'),
                    (core.multiarray.scalar, f'{module_name}.scalar')]
    # numpy >= 1.25 rebuilds a dtype as an instance of its class (numpy.dtypes.Float64DType, ...): the
    # HistoryBuffer arrays hold plain numbers, so the bool/int/float dtype classes are the ones needed.
    entries += [type(np.dtype(name)) for name in PLAIN_NUMPY_DTYPES]
    torch.serialization.add_safe_globals(entries)


def load_local_checkpoint(filename, map_location=None):
    """mmengine's local-file loader with torch's safe loading and a clear refusal."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f'Refused to load {filename}: it holds Python objects beyond tensors and the types mmengine writes, '
            f'and unpickling them could run code ({_unpickler_reason(error)}). If you trust this file (for '
            f'example an official GroupMamba release, which stores its training config), re-save it once as '
            f'plain data with `{TRUST_COMMAND}` and use DST instead.') from None


def _unpickler_reason(error):
    """The part of torch's long weights_only message that names what was refused."""
    text = str(error)
    marker = 'WeightsUnpickler error:'
    if marker not in text:
        return text.strip().splitlines()[0] if text.strip() else type(error).__name__
    reason = text.split(marker, 1)[1].strip()
    # Drop torch's advice to allow-list the object: for an unknown file that is exactly what not to do.
    return reason.split(' Please use', 1)[0].splitlines()[0].strip()


def register_safe_checkpoint_loading():
    allow_mmengine_checkpoint_types()
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)


def to_plain_data(obj, path='', dropped=None):
    """Recursively keep tensors, numbers, strings and containers; convert numpy arrays; drop everything else.

    Returns ``(data, dropped_paths)``.
    """
    dropped = [] if dropped is None else dropped
    if isinstance(obj, (torch.Tensor, int, float, bool, str, bytes, type(None))):
        return obj, dropped
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(obj), dropped
    if isinstance(obj, np.generic):
        return obj.item(), dropped
    if isinstance(obj, dict):  # OrderedDict, yacs CfgNode, ... become plain (ordered) dicts
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            value, _ = to_plain_data(value, f'{path}.{key}' if path else str(key), dropped)
            if value is not _DROPPED:
                out[key] = value
        return out, dropped
    if isinstance(obj, (list, tuple)):
        items = [to_plain_data(v, f'{path}[{i}]', dropped)[0] for i, v in enumerate(obj)]
        items = [v for v in items if v is not _DROPPED]
        return (items if isinstance(obj, list) else tuple(items)), dropped
    dropped.append(f'{path or "<root>"} ({type(obj).__module__}.{type(obj).__qualname__})')
    return _DROPPED, dropped


_DROPPED = object()


def trust_checkpoint(src, dst):
    """Load a checkpoint the user trusts with full unpickling and save it as plain data that loads safely."""
    checkpoint = torch.load(src, map_location='cpu', weights_only=False)
    data, dropped = to_plain_data(checkpoint)
    torch.save(data, dst)
    return dropped


# Keys of the official classifier that a backbone does not have.
CLASSIFICATION_PREFIXES = ('post_network.', 'head.', 'dist_head.')


def extract_backbone_state_dict(checkpoint, prefix=None):
    """The backbone's weights from an official or mmengine checkpoint, and the keys left out (reported).

    Accepts a raw state dict or one under ``state_dict`` / ``model``; keys may carry a ``backbone.`` prefix
    (or ``prefix``), in which case only those keys are taken.
    """
    state = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise TypeError(f'Expected a state dict in the checkpoint, got {type(state).__name__}')
    prefix = prefix or ('backbone.' if any(k.startswith('backbone.') for k in state) else '')
    if prefix and not prefix.endswith('.'):
        prefix += '.'
    left_out = [k for k in state if not k.startswith(prefix)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    classification = [k for k in state if k.startswith(CLASSIFICATION_PREFIXES)]
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFICATION_PREFIXES)}
    return state, left_out, classification


def load_backbone_checkpoint(backbone, filename, prefix=None):
    """Load an official GroupMamba checkpoint into ``backbone``: every backbone key must be present and fit."""
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    state, left_out, classification = extract_backbone_state_dict(checkpoint, prefix)
    own = backbone.state_dict()
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f'{filename}: {key} has shape {tuple(state[key].shape)} but GroupMamba(arch={backbone.arch}) needs '
                f'{tuple(value.shape)}; is the checkpoint for another size?')
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise KeyError(f'{filename} does not fit GroupMamba(arch={backbone.arch}): {len(missing)} missing keys '
                       f'(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]})')
    backbone.load_state_dict(state, strict=True)
    skipped = []
    if classification:
        skipped.append(f'{len(classification)} classification keys ({", ".join(CLASSIFICATION_PREFIXES)})')
    if left_out:
        skipped.append(f'{len(left_out)} keys of other modules (e.g. {left_out[0]})')
    print_log(f'GroupMamba: loaded {len(own)} backbone tensors from {filename}'
              + (f'; skipped {" and ".join(skipped)}' if skipped else ''), logger='current')


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m mmgroupmamba.checkpoint',
        description='Checkpoint utilities of mmgroupmamba.')
    commands = parser.add_subparsers(dest='command', required=True)
    trust = commands.add_parser(
        'trust', help='Unpickle a checkpoint you trust (this can run code in it) and save it as plain data '
        '(tensors, numbers, strings, containers) that loads under torch.load(weights_only=True).')
    trust.add_argument('src')
    trust.add_argument('dst')
    args = parser.parse_args(argv)
    dropped = trust_checkpoint(args.src, args.dst)
    print(f'saved {args.dst}' + (f'; dropped {len(dropped)} non-data objects: {", ".join(dropped)}' if dropped
                                 else ''))


if __name__ == '__main__':
    main()

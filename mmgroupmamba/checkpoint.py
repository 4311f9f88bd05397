"""Checkpoints: mmengine's own files under torch's safe loading, official GroupMamba weights for a backbone, and
clear errors for files that are missing, damaged or not checkpoints at all.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means ``weights_only=True``
and mmengine's own checkpoints (resume, ``load_from``, ``mim test --checkpoint``) are refused, because they
pickle a few non-tensor objects. :func:`allow_mmengine_checkpoint_types` allow-lists exactly those, so safe
loading stays on: a file holding anything else is still refused, with a message naming the explicit opt-in
(``python -m mmgroupmamba.trust_checkpoint SRC DST``) for a file the user trusts.

The released GroupMamba weights (:data:`OFFICIAL_WEIGHTS`) are plain state dicts: they load under safe loading
as they are, from a local path or from their URL (:func:`load_url_checkpoint` replaces mmengine's http(s)
loader, which unpickles downloads with ``weights_only=False``).
"""
import os
import os.path as osp
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

TRUST_COMMAND = 'python -m mmgroupmamba.trust_checkpoint SRC DST'

# The released ImageNet-1k weights of the official GroupMamba code (github.com/Amshaker/GroupMamba, README "Model
# Weights"), each the EMA classifier's state dict saved as an OrderedDict of tensors. Tiny and Small: file names
# and pickle imports as listed on their HuggingFace pages; Base: the same naming (its file list was not checked).
OFFICIAL_WEIGHTS = {
    'tiny': 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Tiny/resolve/main/groupmamba_tiny_ema.pth',
    'small': 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Small/resolve/main/groupmamba_small_ema.pth',
    'base': 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Base/resolve/main/groupmamba_base_ema.pth',
}


class InvalidCheckpointError(RuntimeError):
    """A checkpoint file that is damaged or is not a checkpoint at all."""


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
    """mmengine's local-file loader with torch's safe loading, an integrity check and errors that name the file."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    checked_crc = _check_checkpoint_file(filename)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if not _is_refusal(reason):
            raise InvalidCheckpointError(
                f'{filename} is not a valid checkpoint: its pickle does not parse ({reason}). '
                f'{_DAMAGED_ADVICE}') from None
        raise pickle.UnpicklingError(
            f'Refused to load {filename}: it holds Python objects beyond tensors and the types mmengine writes, '
            f'and unpickling them could run code ({reason}). If you trust this file (for example a training '
            f'checkpoint of the official GroupMamba code, which pickles its config; the released weights need no '
            f'conversion), re-save it once as plain data with `{TRUST_COMMAND}` and use DST instead.') from None
    except Exception as error:  # torch.load's many ways to fail on bytes that are not what it expects
        if checked_crc:
            # Every record's bytes are the ones torch.save wrote (the zip's directory may still be damaged, or the
            # failure is not about the file, e.g. map_location): torch's own message, with the file named.
            raise RuntimeError(f'torch.load could not load {filename}: {type(error).__name__}: {error}') from error
        raise InvalidCheckpointError(
            f'{filename} is not a valid checkpoint: torch.load failed with {type(error).__name__}: {error}. '
            f'The file has no checksums that would tell whether it is damaged. {_DAMAGED_ADVICE}') from error


_DAMAGED_ADVICE = 'If it was downloaded or copied, download or copy it again.'

# The first bytes of files that are mistaken for checkpoints most often.
_TEXT_FILE_EXPLANATIONS = (
    (b'version https://git-lfs', 'it is a Git LFS pointer, not the file it points to: run `git lfs pull` in the '
     'repository it came from, or download the file itself'),
    (b'<!doctype html', 'it is an HTML page: a web page was saved instead of the file (on HuggingFace, download '
     'the "resolve" URL, not the "blob" page)'),
    (b'<html', 'it is an HTML page: a web page was saved instead of the file (on HuggingFace, download the '
     '"resolve" URL, not the "blob" page)'),
)


def _check_checkpoint_file(filename):
    """Raise :class:`InvalidCheckpointError` for a file that is not a torch checkpoint or fails its checksums.

    ``torch.save`` writes a zip archive with a CRC32 per record, which ``torch.load`` never checks: a bit flipped
    in a tensor loads silently as a wrong weight. Returns whether CRCs were checked (files written with
    ``torch.serialization.set_crc32_options(False)`` and legacy pickles have none).
    """
    with open(filename, 'rb') as f:
        head = f.read(64)
    if head.startswith(b'PK'):
        return _check_zip_records(filename)
    # torch.save's format before 1.6 (and a raw torch pickle) starts with the pickle PROTO opcode.
    if head[:1] == b'\x80':
        return False
    lowered = head.lstrip().lower()
    explanation = next((text for start, text in _TEXT_FILE_EXPLANATIONS if lowered.startswith(start)), None)
    if explanation is None:
        explanation = ('it is neither a zip archive (torch.save\'s format since torch 1.6) nor a pickle (the '
                       f'format before); it starts with {head[:24]!r}')
    raise InvalidCheckpointError(f'{filename} is not a checkpoint: {explanation}.')


def _check_zip_records(filename):
    try:
        with zipfile.ZipFile(filename) as archive:
            records = archive.infolist()
            if not any(r.filename.endswith('data.pkl') for r in records):
                raise InvalidCheckpointError(
                    f'{filename} is not a checkpoint: it is a zip archive without the data.pkl record torch.save '
                    f'writes (its records: {[r.filename for r in records[:5]]})')
            checked = False
            for record in records:
                if record.CRC == 0:  # written without CRCs; nothing to compare
                    continue
                # ZipFile raises BadZipFile once a record's bytes do not match its CRC32.
                with archive.open(record) as data:
                    while data.read(1 << 24):
                        pass
                checked = True
            return checked
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as error:
        raise InvalidCheckpointError(
            f'{filename} is not a valid checkpoint: the file is damaged ({error}; torch.save writes a CRC32 '
            f'checksum for every record, which torch.load itself never checks). {_DAMAGED_ADVICE}') from None


def _unpickler_reason(error):
    """The part of torch's long weights_only message that names what was refused or could not be read."""
    # torch >= 2.7 raises its own message from inside the unpickler's error, which holds the reason alone.
    inner = error.__context__
    if isinstance(inner, pickle.UnpicklingError) and str(inner).strip():
        return str(inner).strip().splitlines()[0]
    text = str(error)
    marker = 'WeightsUnpickler error:'
    if marker not in text:
        return text.strip().splitlines()[0] if text.strip() else type(error).__name__
    reason = text.split(marker, 1)[1].strip()
    # Drop torch's advice to allow-list the object: for an unknown file that is exactly what not to do.
    return reason.split(' Please use', 1)[0].splitlines()[0].strip()


def _is_refusal(reason):
    """Whether torch's weights_only unpickler refused an object (rather than failing to parse the bytes)."""
    return 'GLOBAL' in reason or 'allowlisted' in reason or 'add_safe_globals' in reason


def load_url_checkpoint(url, map_location=None):
    """Download ``url`` once into torch's hub cache (where mmengine puts it too) and load it like a local file.

    mmengine's http(s) loader passes the download to ``torch.hub.load_state_dict_from_url``, which unpickles it
    with ``weights_only=False``: any code in the file would run. Here a download is loaded safely, and a failed
    download says what to do instead.
    """
    model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    cached_file = osp.join(model_dir, osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    if rank == 0 and not osp.isfile(cached_file):
        os.makedirs(model_dir, exist_ok=True)
        print_log(f'Downloading {url} to {cached_file}', logger='current')
        try:
            # Writes a temporary file and renames it when complete, so an interrupted download leaves no file.
            torch.hub.download_url_to_file(url, cached_file, progress=sys.stderr.isatty())
        except OSError as error:  # urllib's URLError/HTTPError, timeouts, refused connections
            raise OSError(
                f'Could not download {url} ({error}). Without internet access here, download it on another '
                f'machine, copy it over and give the checkpoint as its local path instead of the URL.') from None
    if world_size > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's download
    return load_local_checkpoint(cached_file, map_location)


def register_safe_checkpoint_loading():
    allow_mmengine_checkpoint_types()
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
    CheckpointLoader.register_scheme(prefixes=['http://', 'https://'], loader=load_url_checkpoint, force=True)


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
# Where trainers put the weights in their checkpoints: mmengine under ``state_dict``, DeiT/timm and the official
# GroupMamba training under ``model``.
STATE_DICT_KEYS = ('state_dict', 'model')


def unwrap_state_dict(checkpoint, keys=STATE_DICT_KEYS, source='the checkpoint'):
    """The state dict inside a loaded checkpoint, and where it was: ``(state_dict, key or 'raw state dict')``.

    The first of ``keys`` (in order of preference) whose value is a dict wraps the weights; without one the
    checkpoint is the state dict itself. A ``module.`` prefix (a DistributedDataParallel model's) is removed.
    ``source`` names the checkpoint in the error for anything but a dict.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'{source} holds a {type(checkpoint).__name__}, not a state dict or a dict wrapping one')
    where = next((key for key in keys if isinstance(checkpoint.get(key), dict)), None)
    state = checkpoint[where] if where is not None else checkpoint
    return {re.sub(r'^module\.', '', key): value for key, value in state.items()}, where or 'raw state dict'


def extract_backbone_state_dict(checkpoint, prefix=None, skip=CLASSIFICATION_PREFIXES):
    """The backbone's weights from an official or mmengine checkpoint, and the keys left out (reported).

    Accepts what :func:`unwrap_state_dict` does; keys may carry a ``backbone.`` prefix (or ``prefix``), in
    which case only those keys are taken. Keys starting with one of ``skip`` (the classifier's parts the
    backbone does not have) are returned apart.
    """
    state, _ = unwrap_state_dict(checkpoint)
    prefix = prefix or ('backbone.' if any(k.startswith('backbone.') for k in state) else '')
    if prefix and not prefix.endswith('.'):
        prefix += '.'
    left_out = [k for k in state if not k.startswith(prefix)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    classification = [k for k in state if k.startswith(skip)]
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    return state, left_out, classification


def official_weights_help(name=None):
    """Where the released weights are, those of the arch called ``name`` first (``None``: an arch without a
    name, see ``mmgroupmamba.models.groupmamba.arch_name``)."""
    if name in OFFICIAL_WEIGHTS:
        where = f'The official ImageNet-1k weights of GroupMamba arch={name!r} are {OFFICIAL_WEIGHTS[name]}'
    else:
        where = ('The official ImageNet-1k weights (none for this arch) are '
                 + ', '.join(f'{n}: {url}' for n, url in OFFICIAL_WEIGHTS.items()))
    return (f'{where}. Give the URL as the checkpoint (model.backbone.init_cfg.checkpoint; downloaded once into '
            'torch\'s hub cache) or the path of a downloaded copy; the file loads as it is.')


def load_backbone_checkpoint(backbone, filename, prefix=None):
    """Load an official GroupMamba checkpoint into ``backbone``: every backbone key must be present and fit."""
    try:
        checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    except FileNotFoundError as error:
        raise FileNotFoundError(f'{error} {official_weights_help(backbone.arch_name)}') from None
    own = backbone.state_dict()
    # GroupMamba(out_type='cls_token') has the class block (post_network.*) and takes it from the checkpoint.
    skip = tuple(p for p in CLASSIFICATION_PREFIXES if not any(k.startswith(p) for k in own))
    state, left_out, classification = extract_backbone_state_dict(checkpoint, prefix, skip)
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
        skipped.append(f'{len(classification)} classification keys ({", ".join(skip)})')
    if left_out:
        skipped.append(f'{len(left_out)} keys of other modules (e.g. {left_out[0]})')
    print_log(f'GroupMamba: loaded {len(own)} backbone tensors from {filename}'
              + (f'; skipped {" and ".join(skipped)}' if skipped else ''), logger='current')


if __name__ == '__main__':
    # The command moved: running this module with runpy warns, because the package's __init__ imports it.
    raise SystemExit(f'The trust command is now `{TRUST_COMMAND}`.')

"""Convert an official GroupMamba ImageNet checkpoint (raw or EMA-wrapped) for the mmpretrain classifier.

    python tools/model_converters/groupmamba_to_mmpretrain.py SRC DST [--weights model_ema|model|...]

Writes ``{'state_dict': ..., 'meta': ...}`` for ``load_from`` / ``mim test --checkpoint``. Every key that
cannot be placed is listed, and nothing is written unless ``--allow-unplaced`` is given.
"""
import argparse
import sys

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from mmgroupmamba.checkpoint import unwrap_state_dict
from mmgroupmamba.cls.convert import WEIGHT_KEYS, convert_official


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (path or URL)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--weights', choices=WEIGHT_KEYS,
                        help=f'which weights of a training checkpoint; default: the first present of {WEIGHT_KEYS}')
    parser.add_argument('--allow-unplaced', action='store_true', help='write even if some keys were not placed')
    args = parser.parse_args(argv)

    checkpoint = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    state_dict, where = unwrap_state_dict(checkpoint, (args.weights, ) if args.weights else WEIGHT_KEYS, args.src)
    if args.weights and where != args.weights:  # unwrap_state_dict fell back to the raw checkpoint
        parser.error(f'{args.src} has no state dict under {args.weights!r}; top-level keys: {sorted(checkpoint)[:20]}')
    converted, unplaced = convert_official(state_dict)
    print(f'{args.src}: {len(state_dict)} tensors from {where}; {len(converted)} placed, {len(unplaced)} not placed')
    for key in unplaced:
        print(f'  not placed: {key} {tuple(state_dict[key].shape)}')
    if unplaced and not args.allow_unplaced:
        print('nothing written (pass --allow-unplaced to write the placed keys anyway)', file=sys.stderr)
        return 1
    torch.save(dict(state_dict=converted, meta=dict(source=str(args.src), weights=where)), args.dst)
    print(f'saved {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

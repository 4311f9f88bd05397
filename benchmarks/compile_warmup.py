"""GPU: fill Inductor's caches for one compiled row of ``backbone_speed.py``, so that a later ``backbone_speed.py
--compile`` in the same machine finds them instead of compiling (GroupMamba-T's det step takes 4-5 minutes).

    TORCHINDUCTOR_CACHE_DIR=DIR python benchmarks/compile_warmup.py NAME {det,cls} [--compile-options JSON]

NAME is a row of ``backbone_speed.py`` without its mode (``GroupMamba-T``, ``Swin-T``). Run one process per
row side by side, then the timed table: each builds its row exactly as ``backbone_speed.py`` does (same
drop-path rate, options and step), which is what makes its cache entries match. Prints the compile time.
"""
import argparse
import json
import time

import torch

from backbone_speed import Classifier, build_backbones, classification_numbers, detection_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help='GroupMamba-T, Swin-T, GroupMamba-S, ...')
    parser.add_argument('task', choices=('det', 'cls'))
    parser.add_argument('--compile-options', type=json.loads, default={})
    parser.add_argument('--batch', type=int, default=128)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    size = args.name.rsplit('-', 1)[-1]
    # backbone_speed.main's drop-path rates: 0.1 for the classifiers, 0.2 for the det rows.
    rows = build_backbones([size], [' +compile'], 0.2 if args.task == 'det' else 0.1, args.compile_options)
    backbone, channels = rows[f'{args.name} +compile']
    start = time.perf_counter()
    if args.task == 'det':
        result = f'{detection_step(backbone, 2):.1f} ms per det step (after compiling)'
    else:
        result = classification_numbers(Classifier(backbone, channels), args.batch, 2, 'fused')
    print(f'{args.name} +compile {args.task}: {time.perf_counter() - start:.0f} s with compiling; {result}',
          flush=True)


if __name__ == '__main__':
    main()

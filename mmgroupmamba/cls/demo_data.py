"""A small generated dataset in ImageNet's layout, for the classification demo and tests.

    python -m mmgroupmamba.cls.demo_data [ROOT]      (default: data/groupmamba_cls_demo, git-ignored)

Layout: ``ROOT/{train,val}/nXXXXXXXX/*.png`` and ``ROOT/meta/{train,val}.txt`` (``relative/path label``), which
mmpretrain's ``ImageNet`` dataset reads with ``data_root=ROOT, split='train'``. Class ``k`` is a stripe pattern
of its own orientation, frequency and colour under noise, so a small model learns it in a few epochs.
"""
import argparse
import math
import os
import os.path as osp

import numpy as np
from PIL import Image

DEFAULT_ROOT = 'data/groupmamba_cls_demo'


def class_image(label, num_classes, size, rng):
    """One noisy image of class ``label``: (size, size, 3) uint8."""
    angle = math.pi * label / num_classes + rng.normal(0, 0.05)
    frequency = 2 + 3 * (label % 3) + rng.normal(0, 0.2)
    ys, xs = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
    colour = 0.3 + 0.7 * np.array([(label * 37 % 10) / 9, (label * 53 % 10) / 9, (label * 71 % 10) / 9])
    image = stripes[..., None] * colour + rng.normal(0, 0.15, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_demo_imagenet(root=DEFAULT_ROOT, num_classes=10, train_per_class=32, val_per_class=8, size=64, seed=0):
    """Write the dataset under ``root`` (overwriting its files) and return ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        lines = []
        for label in range(num_classes):
            folder = f'n{label:08d}'
            os.makedirs(osp.join(root, split, folder), exist_ok=True)
            for i in range(per_class):
                name = f'{folder}/{split}_{label}_{i:04d}.png'
                Image.fromarray(class_image(label, num_classes, size, rng)).save(osp.join(root, split, name))
                lines.append(f'{name} {label}\n')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(lines)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write the GroupMamba classification demo dataset.')
    parser.add_argument('root', nargs='?', default=DEFAULT_ROOT)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--train-per-class', type=int, default=32)
    parser.add_argument('--val-per-class', type=int, default=8)
    parser.add_argument('--size', type=int, default=64)
    args = parser.parse_args(argv)
    root = make_demo_imagenet(args.root, args.num_classes, args.train_per_class, args.val_per_class, args.size)
    print(f'demo ImageNet-format dataset written to {root}')


if __name__ == '__main__':
    main()

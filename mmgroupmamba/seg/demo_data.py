"""Generate a small street-scene dataset in ADE20K's on-disk format, for the CPU segmentation demo and tests.

Layout (what mmseg's ``ADE20KDataset`` reads)::

    OUT/images/training/*.jpg       OUT/annotations/training/*.png
    OUT/images/validation/*.jpg     OUT/annotations/validation/*.png

Label PNGs hold ADE20K's own class ids: 0 is "other" (ignored once ``reduce_zero_label`` maps it to 255) and
``k`` is the k-th ADE20K class, so the demo config reads them with the stock ``ADE20KDataset`` restricted to
``DEMO_CLASSES`` through its ``metainfo``. Each scene has sky over a ground of road or grass, buildings with
window grids on the horizon, textured trees, cars on the road and a few unlabelled ("other") blobs. Image sizes
vary and are mostly not multiples of 32, like real ADE20K images.

Usage::

    python -m mmgroupmamba.seg.demo_data --out data/ade_demo --num-train 200 --num-val 40
"""
import argparse
import os
import os.path as osp

import cv2
import numpy as np
from mmseg.datasets import ADE20KDataset

DEMO_CLASSES = ('building', 'sky', 'tree', 'road', 'grass', 'car')
# ADE20K label-PNG value of each class: its 1-based position in ADE20K's class list (0 = other).
ADE_IDS = {name: ADE20KDataset.METAINFO['classes'].index(name) + 1 for name in DEMO_CLASSES}
OTHER = 0
SPLITS = ('training', 'validation')


def _noise(rng, height, width, scale):
    """Smooth-ish texture: white noise blurred by a random small kernel, zero mean, ~``scale`` amplitude."""
    noise = rng.standard_normal((height, width)).astype(np.float32)
    kernel = int(rng.integers(1, 3)) * 2 + 1
    return cv2.GaussianBlur(noise, (kernel, kernel), 0) * scale


def _paint(image, label, mask, class_name, color, rng, texture):
    """Fill ``mask`` with ``color`` plus texture and write the class id into the label map."""
    height, width = mask.shape
    layer = np.asarray(color, np.float32)[None, None, :] + _noise(rng, height, width, texture)[..., None]
    image[mask] = layer[mask]
    label[mask] = OTHER if class_name is None else ADE_IDS[class_name]


def make_scene(rng, height, width):
    """One ``(BGR uint8 image, uint8 ADE20K label map)`` pair of the given size."""
    image = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    horizon = int(height * rng.uniform(0.35, 0.6))

    # Sky: blue, brighter towards the horizon.
    sky = rows < horizon
    _paint(image, label, sky, 'sky', (rng.uniform(170, 230), rng.uniform(120, 170), rng.uniform(40, 90)), rng, 4)
    image[sky] += (rows[sky, None] / max(horizon, 1)) * 30

    # Ground: grey road or green grass (grass gets a much coarser texture).
    ground = ~sky
    if rng.random() < 0.5:
        _paint(image, label, ground, 'road', (rng.uniform(85, 110),) * 3, rng, 6)
        # Lane markings are part of the road.
        lane_row = horizon + (height - horizon) * 2 // 3
        for x0 in range(int(rng.integers(0, 20)), width, 28):
            image[lane_row:lane_row + 3, x0:x0 + 14] = 220
        ground_class = 'road'
    else:
        _paint(image, label, ground, 'grass', (rng.uniform(30, 60), rng.uniform(120, 170), rng.uniform(40, 80)), rng,
               18)
        ground_class = 'grass'

    # Buildings standing on the horizon, with a grid of dark windows.
    for _ in range(int(rng.integers(1, 4))):
        bw, bh = int(width * rng.uniform(0.15, 0.35)), int(horizon * rng.uniform(0.4, 0.9))
        x0 = int(rng.integers(0, max(width - bw, 1)))
        mask = (cols >= x0) & (cols < x0 + bw) & (rows >= horizon - bh) & (rows < horizon)
        tone = rng.uniform(100, 170)
        _paint(image, label, mask, 'building', (tone * 0.85, tone * 0.9, tone), rng, 5)
        windows = mask & ((rows - (horizon - bh)) % 9 >= 3) & ((rows - (horizon - bh)) % 9 < 7) & \
            ((cols - x0) % 8 >= 3) & ((cols - x0) % 8 < 6)
        image[windows] = (60, 50, 40)

    # Trees: dark green, strongly textured ellipses straddling the horizon.
    for _ in range(int(rng.integers(0, 4))):
        cy = horizon - int(height * rng.uniform(0.0, 0.15))
        cx = int(rng.integers(0, width))
        ry, rx = height * rng.uniform(0.08, 0.18), width * rng.uniform(0.04, 0.1)
        mask = ((rows - cy) / ry)**2 + ((cols - cx) / rx)**2 < 1
        _paint(image, label, mask, 'tree', (rng.uniform(20, 50), rng.uniform(70, 110), rng.uniform(20, 50)), rng, 25)

    # Cars on a road: a saturated body with dark wheels (the wheels are car too).
    if ground_class == 'road':
        for _ in range(int(rng.integers(0, 3))):
            cw, ch = int(width * rng.uniform(0.12, 0.22)), int(height * rng.uniform(0.07, 0.12))
            x0 = int(rng.integers(0, max(width - cw, 1)))
            y0 = int(rng.integers(horizon + 2, max(height - ch, horizon + 3)))
            mask = (cols >= x0) & (cols < x0 + cw) & (rows >= y0) & (rows < y0 + ch)
            color = np.zeros(3)
            color[rng.integers(0, 3)] = rng.uniform(170, 240)
            _paint(image, label, mask, 'car', color + rng.uniform(0, 40), rng, 3)
            for wx in (x0 + cw // 5, x0 + 4 * cw // 5):
                wheel = ((rows - (y0 + ch)) ** 2 + (cols - wx) ** 2) < max(ch // 3, 2) ** 2
                _paint(image, label, wheel, 'car', (25, 25, 25), rng, 2)

    # Unlabelled clutter: mid-grey blobs that must be ignored, not learnt.
    for _ in range(int(rng.integers(0, 2))):
        cy, cx, radius = int(rng.integers(0, height)), int(rng.integers(0, width)), height * rng.uniform(0.03, 0.07)
        _paint(image, label, (rows - cy)**2 + (cols - cx)**2 < radius**2, None, (128, 128, 128), rng, 40)

    return np.clip(image, 0, 255).astype(np.uint8), label


def make_demo_dataset(out_dir, num_train=200, num_val=40, seed=0, min_size=(112, 140), max_size=(168, 230)):
    """Write the dataset under ``out_dir``; return ``{split: number of images}``.

    Sizes ``(height, width)`` are drawn uniformly between ``min_size`` and ``max_size``.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'make_demo_dataset: need at least one image per split, got num_train={num_train}, '
                         f'num_val={num_val}')
    rng = np.random.default_rng(seed)
    counts = dict(zip(SPLITS, (num_train, num_val)))
    for split, count in counts.items():
        image_dir = osp.join(out_dir, 'images', split)
        label_dir = osp.join(out_dir, 'annotations', split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for index in range(count):
            height = int(rng.integers(min_size[0], max_size[0] + 1))
            width = int(rng.integers(min_size[1], max_size[1] + 1))
            image, label = make_scene(rng, height, width)
            name = f'ADE_demo_{split}_{index:05d}'
            if not cv2.imwrite(osp.join(image_dir, name + '.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise OSError(f'make_demo_dataset: could not write {osp.join(image_dir, name + ".jpg")}')
            if not cv2.imwrite(osp.join(label_dir, name + '.png'), label):
                raise OSError(f'make_demo_dataset: could not write {osp.join(label_dir, name + ".png")}')
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/ade_demo', help='dataset root (default: data/ade_demo)')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_demo_dataset(args.out, args.num_train, args.num_val, args.seed)
    print(f'wrote {counts} ADE20K-format images and label PNGs under {args.out}')


if __name__ == '__main__':
    main()

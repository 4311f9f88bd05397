"""A generated COCO-format instance segmentation dataset of flat shapes, for demos and tests that run anywhere.

Every image shows 1 to ``max_objects`` non-overlapping rectangles, ellipses and triangles (random size, rotation
and colour) on a noisy background. Annotations are ordinary COCO json: polygon segmentations (the very polygons
the shapes are filled from), with boxes and areas as pycocotools rasterises them, so mmdet's ``CocoDataset``
and ``CocoMetric`` (bbox and segm) read them unchanged.

:class:`ShapesCocoDataset` generates its split on first use and then reads the cache; the command

    python -m mmgroupmamba.det.demo_data OUT_DIR --split train --num-images 512 --seed 0

writes a split in COCO layout (``OUT_DIR/annotations/instances_<split>.json`` and ``OUT_DIR/<split>/*.png``).
"""
import json
import math
import os
import os.path as osp

import cv2
import numpy as np
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.dist import barrier, is_main_process
from mmengine.logging import print_log
from pycocotools import mask as mask_utils

SHAPE_CLASSES = ('rectangle', 'ellipse', 'triangle')
# Records the generator's settings inside the annotation file, so a cache made with other settings is caught.
GENERATOR_KEY = 'mmgroupmamba_shapes'
ELLIPSE_VERTICES = 32


def _shape_polygon(rng, name, center, size):
    """Vertices ``(N, 2)`` (x, y) of a shape of the given class, extent about ``size`` pixels, random rotation."""
    half = size / 2
    if name == 'rectangle':
        aspect = rng.uniform(0.5, 1.0)
        local = np.array([[-half, -half * aspect], [half, -half * aspect], [half, half * aspect],
                          [-half, half * aspect]])
    elif name == 'ellipse':
        angles = np.linspace(0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
        local = np.stack([half * np.cos(angles), half * rng.uniform(0.5, 1.0) * np.sin(angles)], axis=1)
    else:  # triangle: three corners on the circle of radius ``half``, no two closer than 90 degrees
        angles = rng.uniform(0, 2 * math.pi) + np.array([0.0, rng.uniform(0.5, 0.75), rng.uniform(1.25, 1.5)]) * math.pi
        local = half * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    theta = rng.uniform(0, math.pi)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return local @ rotation.T + np.asarray(center)


def _contrasting_colour(rng, background):
    """A random colour at least 80 (sum over channels) away from the background colour."""
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= 80:
            return colour


def _draw_image(rng, height, width, max_objects, min_size, max_size):
    """One image (H, W, 3 uint8 BGR) and its objects as (class index, polygon (N, 2) int32)."""
    background = rng.integers(0, 256, 3)
    image = np.clip(background + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    occupied = np.zeros((height, width), bool)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        # A few placements are tried; a shape that finds no free room is left out of this image.
        for _ in range(20):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            size = rng.uniform(min_size, max_size)
            center = rng.uniform(size / 2, np.array([width, height]) - size / 2)  # (x, y)
            polygon = np.round(_shape_polygon(rng, SHAPE_CLASSES[label], center, size)).astype(np.int32)
            mask = np.zeros((height, width), np.uint8)
            cv2.fillPoly(mask, [polygon], 1)
            # Keep a gap of 2 pixels to other shapes, so no shape hides part of another.
            if not (cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool) & occupied).any():
                break
        else:
            continue
        occupied |= mask.astype(bool)
        cv2.fillPoly(image, [polygon], _contrasting_colour(rng, background).tolist())
        objects.append((label, polygon))
    return image, objects


def image_shape(image_size, aspect_ratio):
    """``(height, width)`` of an image whose longer side is ``image_size`` and whose width / height is
    ``aspect_ratio``."""
    if aspect_ratio >= 1:
        return max(1, round(image_size / aspect_ratio)), image_size
    return image_size, max(1, round(image_size * aspect_ratio))


def generator_settings(num_images, image_size, max_objects, min_size, max_size, seed, aspect_ratios):
    """The settings a split is generated with, as its annotation file records them."""
    settings = dict(num_images=num_images, image_size=image_size, max_objects=max_objects, min_size=min_size,
                    max_size=max_size, seed=seed)
    aspect_ratios = [float(r) for r in aspect_ratios]
    if aspect_ratios != [1.0]:
        settings['aspect_ratios'] = aspect_ratios  # absent for squares: caches written before it stay valid
    return settings


def generate_shapes_coco(ann_file, img_dir, num_images, image_size=128, max_objects=4, min_size=20, max_size=56,
                         seed=0, aspect_ratios=(1.0, )):
    """Write ``num_images`` PNG images into ``img_dir`` and their COCO instance annotations to ``ann_file``.

    Images are ``image_size`` on their longer side, with a width / height ratio drawn from ``aspect_ratios``
    per image (default: squares; e.g. ``(4 / 3, 3 / 2, 1, 3 / 4)`` mixes sizes like COCO's, so that batches come
    in several padded sizes). The annotation file is written last, so its presence means the split is complete.
    """
    settings = generator_settings(num_images, image_size, max_objects, min_size, max_size, seed, aspect_ratios)
    aspect_ratios = settings.get('aspect_ratios', [1.0])
    shortest = min(min(image_shape(image_size, r)) for r in aspect_ratios) if aspect_ratios else 0
    if not aspect_ratios or not 0 < min_size <= max_size < shortest:
        raise ValueError(f'ShapesCoco: need 0 < min_size <= max_size < the shortest image side ({shortest}) and '
                         f'at least one aspect ratio, got {settings}')
    rng = np.random.default_rng(seed)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(osp.dirname(osp.abspath(ann_file)), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        # Squares draw no ratio, so their images are the same as before aspect ratios existed.
        ratio = aspect_ratios[int(rng.integers(len(aspect_ratios)))] if len(aspect_ratios) > 1 else aspect_ratios[0]
        height, width = image_shape(image_size, ratio)
        image, objects = _draw_image(rng, height, width, max_objects, min_size, max_size)
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(osp.join(img_dir, file_name), image)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        for label, polygon in objects:
            segmentation = [polygon.reshape(-1).astype(float).tolist()]
            # Area and box of the polygon as the COCO tools rasterise it, as in COCO's own annotations.
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            annotations.append(
                dict(id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0,
                     segmentation=segmentation, area=float(mask_utils.area(rle)),
                     bbox=mask_utils.toBbox(rle).tolist()))
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(SHAPE_CLASSES)]
    coco = dict(info={'description': 'generated shapes', GENERATOR_KEY: settings}, licenses=[], images=images,
                annotations=annotations, categories=categories)
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return settings


def cached_settings(ann_file):
    """The generator settings recorded in an existing annotation file."""
    with open(ann_file) as f:
        info = json.load(f).get('info', {})
    if GENERATOR_KEY not in info:
        raise ValueError(f'ShapesCocoDataset: {ann_file} exists but was not written by the shapes generator; '
                         f'point data_root/ann_file at an empty location to generate the split there')
    return info[GENERATOR_KEY]


@DATASETS.register_module()
class ShapesCocoDataset(CocoDataset):
    """:class:`mmdet.datasets.CocoDataset` over generated shapes, generated into ``data_root`` on first use.

    Args:
        num_images (int): images of this split.
        image_size (int): the images' longer side.
        aspect_ratios (Sequence[float]): width / height ratios, one drawn per image (default: squares).
        max_objects (int): most shapes per image (at least one each).
        min_size, max_size (float): range of the shapes' extent in pixels.
        seed (int): random seed; give every split its own.
        Others: as :class:`CocoDataset` (``ann_file`` and ``data_prefix['img']`` say where the split goes).
    """

    METAINFO = dict(classes=SHAPE_CLASSES, palette=[(220, 20, 60), (0, 128, 255), (60, 180, 75)])
    # Its files need not exist before a run: PreflightRunner (mmgroupmamba/runner.py) does not ask for them.
    creates_missing_data = True

    def __init__(self, *args, num_images, image_size=128, max_objects=4, min_size=20, max_size=56, seed=0,
                 aspect_ratios=(1.0, ), **kwargs):
        self.generator_settings = generator_settings(num_images, image_size, max_objects, min_size, max_size, seed,
                                                     aspect_ratios)
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        # Rank 0 generates, the others wait for it; afterwards every rank reads the same cached files.
        if is_main_process():
            if osp.exists(self.ann_file):
                cached = cached_settings(self.ann_file)
                if cached != self.generator_settings:
                    raise ValueError(f'ShapesCocoDataset: {self.ann_file} was generated with {cached}, but the '
                                     f'config asks for {self.generator_settings}; delete it or set another '
                                     f'data_root')
            else:
                print_log(f'Generating {self.generator_settings["num_images"]} shape images into '
                          f'{self.data_prefix["img"]} and {self.ann_file}', logger='current')
                generate_shapes_coco(self.ann_file, self.data_prefix['img'], **self.generator_settings)
        barrier()
        return super().load_data_list()

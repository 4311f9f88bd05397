"""Detection parts of mmgroupmamba (imported by the configs in configs/mmdet/ through custom_imports)."""
from .shapes_coco import SHAPE_CLASSES, ShapesCocoDataset, generate_shapes_coco

__all__ = ['SHAPE_CLASSES', 'ShapesCocoDataset', 'generate_shapes_coco']

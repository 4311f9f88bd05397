"""Detection parts of mmgroupmamba (imported by the configs in configs/mmdet/ through custom_imports)."""
from .batch_pad import BatchPadToFixedSizes
from .shapes_coco import SHAPE_CLASSES, ShapesCocoDataset, generate_shapes_coco

__all__ = ['BatchPadToFixedSizes', 'SHAPE_CLASSES', 'ShapesCocoDataset', 'generate_shapes_coco']

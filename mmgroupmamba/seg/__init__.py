"""Segmentation parts of mmgroupmamba (imported by the configs in configs/mmseg/ through custom_imports)."""

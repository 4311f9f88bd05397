"""Detection parts of mmgroupmamba (imported by the configs in configs/mmdet/ through custom_imports)."""

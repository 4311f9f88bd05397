"""Classification parts of mmgroupmamba (imported by the configs in configs/mmpretrain/ through custom_imports)."""

"""Segmentation parts of mmgroupmamba.

The UperNet configs in configs/mmseg/ need no segmentation-specific modules: they load the backbone through
``custom_imports=dict(imports=['mmgroupmamba'])`` and use mmseg's own heads, datasets and metrics. This package
holds the generator of the ADE20K-format demo dataset, run as ``python -m mmgroupmamba.seg.demo_data``;
it is not imported here, so that running it as a module does not import it twice (runpy warns about that).
"""

"""Selective scan of GroupMamba: the op API, its PyTorch reference and (in its own module) the Triton kernels.

Installed as ``mmgroupmamba.kernels``.
"""
from .directions import SCAN_DIRECTIONS, scan_order_index
from .reference import linear_recurrence, selective_scan_reference
from .scan import selective_scan

__all__ = ['SCAN_DIRECTIONS', 'scan_order_index', 'linear_recurrence', 'selective_scan',
           'selective_scan_reference']

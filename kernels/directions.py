"""The four scan directions of a GroupMamba layer, one per channel group (official group order)."""
import torch

# Group g of a layer scans its tokens in SCAN_DIRECTIONS[g] order.
SCAN_DIRECTIONS = ('row_major', 'column_major', 'row_major_reversed', 'column_major_reversed')


def scan_order_index(hw, groups, device=None):
    """Index ``(groups, H*W)``: entry ``[g, t]`` is the row-major position visited at scan step ``t``."""
    if groups != len(SCAN_DIRECTIONS):
        raise ValueError(f'GroupMamba scans {len(SCAN_DIRECTIONS)} channel groups, got groups={groups}')
    height, width = hw
    row_major = torch.arange(height * width, device=device)
    column_major = row_major.view(height, width).t().reshape(-1)
    return torch.stack([row_major, column_major, row_major.flip(0), column_major.flip(0)])

"""Padding of training batches to a few fixed sizes, so that a CUDA-graphed backbone sees few input sizes."""
from mmdet.models.data_preprocessors.data_preprocessor import BatchFixedSizePad
from mmdet.registry import MODELS
from torch import nn


@MODELS.register_module()
class BatchPadToFixedSizes(nn.Module):
    """Pads each batch to the first of ``sizes`` that holds it: mmdet's ``BatchFixedSizePad`` with a list.

    Why: ``GroupMamba(cuda_graph=True)`` replays graphs recorded per input size (at most 16). Mask R-CNN's
    keep-ratio resize to (1333, 800) and padding to multiples of 32 give dozens of batch sizes on COCO; padded
    to a few listed sizes (``configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py`` lists seven), every batch
    replays one of a few graphs, for a little more padding. List the sizes smallest first. Used as a
    ``batch_augments`` entry of the detector's ``data_preprocessor`` (training batches only, as mmdet
    applies batch augments).

    Args:
        sizes (Sequence[tuple[int, int]]): ``(h, w)`` sizes, tried in order.
        **pad_kwargs: ``BatchFixedSizePad``'s other arguments (``pad_mask``, ``img_pad_value``, ...).
    """

    def __init__(self, sizes, **pad_kwargs):
        super().__init__()
        if not sizes:
            raise ValueError('BatchPadToFixedSizes: sizes is empty')
        self.pads = nn.ModuleList(BatchFixedSizePad(tuple(size), **pad_kwargs) for size in sizes)

    def forward(self, inputs, data_samples=None):
        height, width = inputs.shape[-2:]
        for pad in self.pads:
            if height <= pad.size[0] and width <= pad.size[1]:
                return pad(inputs, data_samples)
        raise ValueError(f'BatchPadToFixedSizes: a {height}x{width} batch fits none of the sizes '
                         f'{[pad.size for pad in self.pads]}; add a size that holds it')

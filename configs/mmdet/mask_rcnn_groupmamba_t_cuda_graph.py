# Mask R-CNN GroupMamba-T, 1x, with the backbone's forward and backward replayed from CUDA graphs: the eager
# backbone step is bound by the host issuing ~3900 launches (README, Speed). Training batches are padded to
# one of seven sizes, so every one replays a recorded graph (mmgroupmamba.det.BatchPadToFixedSizes). Test
# images keep their own sizes: they are recorded while the backbone's 16 signatures last, then run eagerly.
# Accuracy is not measured yet: padding reaches further into GroupMamba's features than into a conv net's
# (the channel affinity averages over the whole map, the scans run through the padded area), so the sizes
# are chosen to add little of it.
_base_ = './mask_rcnn_groupmamba_t.py'

model = dict(
    backbone=dict(cuda_graph=True),
    data_preprocessor=dict(batch_augments=[
        # Resize keeps the ratio within (1333, 800), then batches are padded to multiples of 32. COCO's most
        # common images, 640x480 and 640x427, become 800x1088 and 800x1216 batches: no extra padding. Wider
        # ones go to 800x1344, portrait ones to the transposed sizes, mixed batches to 1344x1344.
        dict(type='BatchPadToFixedSizes',
             sizes=[(800, 1088), (800, 1216), (800, 1344), (1088, 800), (1216, 800), (1344, 800), (1344, 1344)],
             pad_mask=True),
    ]))

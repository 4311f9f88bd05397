# Mask R-CNN GroupMamba-T, 1x, with the backbone's forward and backward replayed from CUDA graphs: the eager
# backbone step is bound by the host issuing ~3900 launches (README, Speed). Training batches are padded to
# one of three sizes, so every one replays a recorded graph (mmgroupmamba.det.BatchPadToFixedSizes). Test
# images keep their own sizes: the first 8 sizes are recorded, later ones run eagerly.
# Accuracy is not measured yet: the extra padding reaches further into GroupMamba's features than into a conv
# net's (the channel affinity averages over the whole map, the scans run through the padded area), and test
# images are padded less than training batches.
_base_ = './mask_rcnn_groupmamba_t.py'

model = dict(
    backbone=dict(cuda_graph=True),
    data_preprocessor=dict(batch_augments=[
        # Resize keeps the ratio within (1333, 800), padded to multiples of 32: landscape batches fit
        # 800x1344, portrait ones 1344x800, mixed ones 1344x1344.
        dict(type='BatchPadToFixedSizes', sizes=[(800, 1344), (1344, 800), (1344, 1344)], pad_mask=True),
    ]))

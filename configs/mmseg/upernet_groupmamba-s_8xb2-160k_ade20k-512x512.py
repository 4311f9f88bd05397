# UperNet + GroupMamba-S on ADE20K: the GroupMamba-T recipe with the small backbone (drop path 0.3, as VMamba-S).
_base_ = './upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'

checkpoint_file = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Small/resolve/main/groupmamba_small_ema.pth'
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[64, 128, 348, 512]))

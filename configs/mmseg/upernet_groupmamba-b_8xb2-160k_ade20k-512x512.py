# UperNet + GroupMamba-B on ADE20K: the GroupMamba-T recipe with the base backbone (drop path 0.6, as VMamba-B).
_base_ = './upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py'

checkpoint_file = 'https://huggingface.co/Abdelrahman-shaker/GroupMamba-Base/resolve/main/groupmamba_base_ema.pth'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6, init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 424, 512]),
    auxiliary_head=dict(in_channels=424))

_base_ = './groupmamba_t_8xb128_in1k.py'

model = dict(backbone=dict(arch='small'))

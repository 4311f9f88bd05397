# paramwise_cfg custom_keys shared by the GroupMamba detection and segmentation configs: no weight decay on the
# selective-scan parameters (state decay rates A_logs, skips Ds, step-size biases dt_projs_bias, the layers'
# skip_scale). The configs add norm_decay_mult=0.0 for the norm layers.
groupmamba_no_decay_keys = {
    '.A_logs': dict(decay_mult=0.0),
    '.Ds': dict(decay_mult=0.0),
    '.dt_projs_bias': dict(decay_mult=0.0),
    '.skip_scale': dict(decay_mult=0.0),
}

"""What a backbone's forward accepts, said before the first conv fails with a message about memory formats.

Only Python checks of ``ndim``, ``shape``, ``dtype`` and ``device``: under ``torch.compile`` dynamo evaluates them
while tracing (they guard on what the graph is specialised for anyway), so they add no graph break and no op.
"""
import torch


def check_image_batch(x, reference_param, in_channels=3, who='GroupMamba'):
    """Raise a ``TypeError``/``ValueError`` that says what is expected unless ``x`` is an image batch the model runs.

    Args:
        x: the forward's input.
        reference_param (Tensor): a parameter of the first layer: the batch must have its dtype (or run under
            autocast) and device.
        in_channels (int): the channels the first layer takes.
        who (str): the model's name, for the message.
    """
    expected = f'{who} expects an image batch N x {in_channels} x H x W (in_channels={in_channels})'
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{expected}, got a {type(x).__name__}; stack images of shape ({in_channels}, H, W) into one '
                        f'tensor with torch.stack')
    if x.ndim != 4:
        hint = '; for one image use x[None]' if x.ndim == 3 and x.shape[0] == in_channels else ''
        raise ValueError(f'{expected}, got a {x.ndim}-D tensor of shape {tuple(x.shape)}{hint}')
    if x.shape[1] != in_channels:
        hint = ('; this looks like N x H x W x C (channels last): use x.permute(0, 3, 1, 2)'
                if x.shape[3] == in_channels else '')
        raise ValueError(f'{expected}, got {x.shape[1]} channels in a tensor of shape {tuple(x.shape)}{hint}')
    if not x.is_floating_point():
        raise TypeError(f'{expected} of floating-point values, got {x.dtype}; normalise the images to float (the '
                        f'OpenMMLab data preprocessors do) or convert with x.float()')
    if x.device != reference_param.device:
        raise ValueError(f'{expected} on the model\'s device {reference_param.device}, got one on {x.device}; move it '
                         f'with x.to({str(reference_param.device)!r})')
    if x.dtype != reference_param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f'{expected} in the model\'s dtype {reference_param.dtype}, got {x.dtype}; convert the batch '
            f'(x.to({reference_param.dtype})) or the model (model.to({x.dtype})), or run mixed precision under '
            f'torch.autocast({x.device.type!r}, dtype={x.dtype}) (AmpOptimWrapper in OpenMMLab configs)')

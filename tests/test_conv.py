"""``mmgroupmamba/models/conv.py``: the conv whose compiled backward stays ATen's (symbolic sizes survive it on
torch 2.14). Its custom ops pass ``torch.library.opcheck``, and the module gives ``nn.Conv2d``'s outputs and
gradients bit for bit, eagerly and compiled. That it compiles one graph for several sizes under Inductor is
``tests/test_conv_backward_guard.py``'s."""
import pytest
import torch
import torch.nn as nn

from mmgroupmamba.models.conv import OpaqueConv2d, conv2d, conv2d_backward

# (in channels, out channels, kernel, stride, padding, groups, bias): the stem's 7x7 s2 and 3x3 convs (no bias),
# the downsampling 3x3 s2 conv with bias, and a grouped one.
CONVS = [(3, 8, 7, 2, 3, 1, False), (8, 8, 3, 1, 1, 1, False), (8, 16, 3, 2, 1, 1, True), (8, 8, 3, 1, 1, 4, True)]


def conv_args(in_ch, out_ch, kernel, stride, padding, groups, bias, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_ch, 9, 11, generator=gen)
    if channels_last:  # as the backbone passes its maps
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_ch, in_ch // groups, kernel, kernel, generator=gen)
    b = torch.randn(out_ch, generator=gen) if bias else None
    return x, weight, b, [stride, stride], [padding, padding], [1, 1], groups


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('spec', CONVS)
def test_opcheck(spec, channels_last):
    x, weight, bias, *rest = conv_args(*spec, channels_last)
    torch.library.opcheck(conv2d, (x.requires_grad_(), weight.requires_grad_(),
                                   None if bias is None else bias.requires_grad_(), *rest))
    out = conv2d(x.detach(), weight.detach(), bias, *rest)
    for mask in ([True, True, bias is not None], [False, True, False], [True, False, False]):
        torch.library.opcheck(conv2d_backward, (torch.randn_like(out), x.detach(), weight.detach(), *rest, mask))


def pair(spec):
    in_ch, out_ch, kernel, stride, padding, groups, bias = spec
    torch.manual_seed(0)
    plain = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=bias)
    opaque = OpaqueConv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=bias)
    opaque.load_state_dict(plain.state_dict())
    return plain, opaque


def outputs_and_grads(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    module.zero_grad(set_to_none=True)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize('spec', CONVS)
def test_eager_and_compiled_give_nn_conv2ds_results(spec):
    plain, opaque = pair(spec)
    x = conv_args(*spec, channels_last=True)[0]
    expected = outputs_and_grads(plain, x)
    assert all(torch.equal(a, b) for a, b in zip(outputs_and_grads(opaque, x), expected))
    torch._dynamo.reset()
    compiled = torch.compile(opaque, backend='aot_eager', fullgraph=True, dynamic=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs_and_grads(compiled, x), expected))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_compiled_under_autocast_gives_eager_autocasts_results(dtype):
    """Autocast casts a conv's inputs but not a custom op's: the module casts them itself when compiled."""
    plain, opaque = pair(CONVS[2])
    x = conv_args(*CONVS[2], channels_last=True)[0]
    with torch.autocast('cpu', dtype=dtype):
        expected = outputs_and_grads(plain, x)
        torch._dynamo.reset()
        compiled = torch.compile(opaque, backend='aot_eager', fullgraph=True, dynamic=True)
        got = outputs_and_grads(compiled, x)
    assert expected[0].dtype == got[0].dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_only_zero_padding_in_pixels():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        OpaqueConv2d(4, 4, 3, padding=1, padding_mode='reflect')
    with pytest.raises(ValueError, match="padding='same'"):
        OpaqueConv2d(4, 4, 3, padding='same')

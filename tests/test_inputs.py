"""GroupMamba's forward says what input it expects (issue #17, item 7), and the check costs torch.compile nothing."""
import pytest
import torch

from mmgroupmamba.models import GroupMamba
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS
from mmgroupmamba.models.inputs import check_image_batch

TINY_ARCH = ARCH_SETTINGS['mini']


@pytest.fixture(scope='module')
def model():
    return GroupMamba(arch=TINY_ARCH).eval()


def test_a_single_image_without_batch_dimension_is_explained(model):
    with pytest.raises(ValueError) as info:
        model(torch.randn(3, 32, 32))
    message = str(info.value)
    assert 'N x 3 x H x W' in message and '(3, 32, 32)' in message and 'x[None]' in message, message


def test_channels_last_image_batch_is_explained(model):
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 32, 32, 3))
    message = str(info.value)
    assert 'N x 3 x H x W' in message and '(2, 32, 32, 3)' in message and 'permute(0, 3, 1, 2)' in message, message


def test_wrong_number_of_channels_is_explained():
    model = GroupMamba(arch=TINY_ARCH, in_channels=4).eval()
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert 'N x 4 x H x W' in message and 'in_channels=4' in message and '3 channels' in message, message


def test_half_batch_for_a_float_model_names_both_dtypes_and_autocast(model):
    with pytest.raises(TypeError) as info:
        model(torch.randn(1, 3, 32, 32).half())
    message = str(info.value)
    assert 'torch.float16' in message and 'torch.float32' in message and 'torch.autocast' in message, message


def test_integer_images_are_explained(model):
    with pytest.raises(TypeError) as info:
        model(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    assert 'torch.uint8' in str(info.value) and 'floating-point' in str(info.value)


def test_not_a_tensor_is_explained(model):
    with pytest.raises(TypeError, match='N x 3 x H x W.*list'):
        model([torch.randn(3, 32, 32)])


def test_batch_of_another_dtype_runs_under_autocast(model):
    x = torch.randn(1, 3, 32, 32).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        outs = model(x)
    assert [o.shape[1] for o in outs] == TINY_ARCH['embed_dims'] and all(o.isfinite().all() for o in outs)


def test_check_traces_without_graph_breaks():
    """Shape, dtype and device checks only: dynamo evaluates them while tracing, fullgraph=True proves no break."""
    weight = torch.randn(16, 3, 7, 7)

    def checked_double(x):
        check_image_batch(x, weight, in_channels=3)
        return x * 2

    compiled = torch.compile(checked_double, backend='eager', fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(compiled(x), x * 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(compiled(x.bfloat16()), x.bfloat16() * 2)

"""``benchmarks/gradient_check.py``: the comparison that ``check_gpu.py`` and ``regional_compile.py`` use to judge
a compiled backbone's outputs and gradients against eager, in fp32 and under AMP (against fp32)."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import gradient_check  # noqa: E402
from gradient_check import LOSS_SCALE, Comparison, outputs_and_grads  # noqa: E402


class TwoOutputs(nn.Module):
    """Outputs scaled by 1e-6, as a backbone's loss leaves its deeper gradients: unscaled, fp16 flushes them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        return [hidden * 1e-6, self.second(hidden) * 1e-6]


@pytest.fixture
def models():
    torch.manual_seed(0)
    model = TwoOutputs()
    return model, copy.deepcopy(model), torch.randn(64, 16)


@pytest.mark.parametrize('amp', [False, True])
def test_the_same_model_passes(models, amp):
    eager, other, images = models
    result = Comparison(eager, other, images, amp=amp)
    assert result.ok(), str(result)
    assert result.out_err == 0 and result.grad_err == 0


@pytest.mark.parametrize('amp', [False, True])
def test_a_wrong_gradient_fails(models, amp):
    eager, other, images = models
    with torch.no_grad():
        other.second.weight.mul_(1.1)  # the first layer's gradient goes through it: 10% off
    result = Comparison(eager, other, images, amp=amp)
    assert not result.ok(), str(result)
    assert result.grad_err > 0.05


def test_amp_gradients_are_scaled_and_come_back_unscaled(models):
    """Under AMP the backward runs scaled (the gradients, ~1e-7 here, are normal fp16 numbers only then) and
    returns them unscaled: within fp16 rounding of fp32's, where an unscaled fp16 backward loses them."""
    eager, _, images = models
    _, grads_fp32 = outputs_and_grads(eager, images, amp=False)
    _, grads_amp = outputs_and_grads(eager, images, amp=True)
    _, grads_unscaled = outputs_and_grads(eager, images, amp=True, loss_scale=1.0)
    for name, grad in grads_fp32.items():
        scaled_err = ((grads_amp[name] - grad).norm() / grad.norm()).item()
        unscaled_err = ((grads_unscaled[name] - grad).norm() / grad.norm()).item()
        assert scaled_err < 1e-2, (name, scaled_err)
        assert unscaled_err > 10 * scaled_err, (name, unscaled_err, scaled_err)
    assert LOSS_SCALE == 2.0 ** 16


def test_amp_bounds_take_eager_error_over_a_parameter_kind():
    """One block's eager AMP error can be luckily small (a cancelling sum): the bound is its kind's worst, each
    stage's blocks a kind of their own, and never below the floor."""
    eager = {'block3.0.attn.skip_scale': 1e-3, 'block3.1.attn.skip_scale': 5e-2,
             'block4.0.attn.skip_scale': 1e-3, 'block3.0.attn.Ds': 4e-3, 'norm3.weight': 1e-3}
    bounds = gradient_check.amp_bounds(eager)
    assert gradient_check.parameter_kind('block3.1.attn.skip_scale') == 'block3.*.attn.skip_scale'
    assert bounds['block3.0.attn.skip_scale'] == bounds['block3.1.attn.skip_scale'] == gradient_check.AMP_FACTOR * 5e-2
    assert bounds['block4.0.attn.skip_scale'] == gradient_check.FP32_FLOOR
    assert bounds['block3.0.attn.Ds'] == gradient_check.AMP_FACTOR * 4e-3
    assert bounds['norm3.weight'] == gradient_check.FP32_FLOOR


def test_amp_noise_is_sampled_over_perturbed_copies_of_the_input(models):
    """Eager AMP's error on one input can be a lucky draw: its errors on perturbed copies of the input (each
    against that copy's own fp32 gradients) enter the bound, which is never below the input's own."""
    eager, other, images = models
    result = Comparison(eager, other, images, amp=True)
    first = {n: e for n, (e, _) in result.against_fp32.items()}
    assert set(result.amp_noise) == set(first)
    assert all(result.amp_noise[n] >= first[n] for n in first)
    assert any(result.amp_noise[n] > first[n] for n in first), (result.amp_noise, first)
    assert all(result.amp_bound(n) == bound for n, bound in gradient_check.amp_bounds(result.amp_noise).items())
    copies = gradient_check.perturbed_inputs(images)
    assert len(copies) == gradient_check.AMP_DRAWS
    for copy_ in copies:
        moved = ((copy_ - images) / images).abs()
        # about fp16's last place: enough to round anew, far too little to change the maths
        assert gradient_check.PERTURBATION / 8 < moved.median() < gradient_check.PERTURBATION
        assert moved.max() < 8 * gradient_check.PERTURBATION
    assert not torch.equal(copies[0], copies[1])


class Cancelling(nn.Module):
    """A gradient that fp32's rounding alone moves by percents: ``offset_scale``'s is a sum over ``h + 1e4``
    (rounded to 1e-3 in fp32) whose 1e4 cancels under an alternating loss. ``split`` adds the offset in two halves,
    a different rounding of the same maths (as a compiled graph may order its sums)."""

    def __init__(self, split=False):
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.offset_scale = nn.Parameter(torch.ones(1))
        self.split = split

    def forward(self, x):
        h = self.linear(x)
        shifted = (h + 5e3) + 5e3 if self.split else h + 1e4
        return [h * 1e-6, self.offset_scale * shifted * 1e-6]


def alternating_loss(outs):
    return sum((o.float() * torch.tensor([1.0, -1.0]).repeat(o.shape[-1] // 2)).mean() for o in outs)


@pytest.fixture
def cancelling_models():
    torch.manual_seed(0)
    model = Cancelling()
    other = Cancelling(split=True)
    other.load_state_dict(model.state_dict())
    return model, other, torch.randn(64, 16)


def test_fp32_bound_widens_for_a_gradient_fp32_cannot_resolve(cancelling_models):
    """Two roundings of one sum differ by more than the fp32 bound (1e-3) where fp32 itself is percents from fp64:
    the bound is then a multiple of that error, named in the result; a model wrong elsewhere still fails."""
    eager, other, images = cancelling_models
    result = Comparison(eager, other, images, amp=False, loss_fn=alternating_loss)
    assert result.errs['offset_scale'] > 1e-3, result.errs
    noise = result.ill_conditioned['offset_scale']
    assert set(result.ill_conditioned) == {'offset_scale'} and noise > 1e-3
    assert result.fp32_bound('offset_scale') == gradient_check.FP32_NOISE_FACTOR * noise
    assert result.fp32_bound('linear.weight') == 1e-3
    assert result.ok(), str(result)
    assert 'most offset_scale' in str(result)
    with torch.no_grad():
        other.linear.weight.mul_(1.01)
    assert not Comparison(eager, other, images, amp=False, loss_fn=alternating_loss).ok()


def test_amp_leaves_out_what_fp32_cannot_resolve(cancelling_models):
    """Under AMP a gradient that fp32 moves by more than ILL_CONDITIONED from fp64 is named, not judged; the others
    are judged as before."""
    eager, other, images = cancelling_models
    result = Comparison(eager, other, images, amp=True, loss_fn=alternating_loss)
    assert 'offset_scale' in result.ill_conditioned and 'offset_scale' not in result.against_fp32
    assert set(result.against_fp32) == {'linear.weight', 'linear.bias'}
    assert result.ok(), str(result)
    assert '(not judged under AMP), most offset_scale' in str(result)

"""Compiled against eager: outputs and parameter gradients, with AMP judged against fp32 (shared by
``check_gpu.py`` and ``regional_compile.py``).

Under AMP fp16 the loss is multiplied by ``loss_scale`` (GradScaler's initial scale) before backward, as AMP
training does, and the gradients are divided by it afterwards. Unscaled, most of a backbone's parameter gradients
lie below fp16's smallest normal number (6.1e-5): GroupMamba-T's ``dt_projs_weight`` gradients are 1e-9..7e-8 for
a mean over its outputs (fp32, CPU), below even the smallest subnormal (6e-8), so an fp16 backward rounds them to
zero or to one unit, and two correct backward passes compare as unrelated numbers (the twenty-first session's
first H200 run of ``check_gpu.py --compile static`` printed 1.37 for one of them; the sixteenth session's
``regional_compile.py`` 11 for a plain mean's).

Scaled, AMP gradients still differ from eager AMP's by 16-bit rounding, most for the few parameters summed over
every position with much cancellation (``skip_scale``: 2-6% from fp32 eagerly, sixteenth session). So a
compiled AMP gradient is judged against eager **fp32**, beside eager AMP's own error there: compiled may be worse
than eager by a bounded factor, not arbitrarily.

Eager AMP's error is taken over the parameter's kind (:func:`parameter_kind`: the same parameter of every block
of a stage), not the parameter alone: where a gradient is a sum with much cancellation, how far 16-bit rounding
moves it is luck of the draw, and one block's eager error can be far below its siblings'. The twenty-second
session's H200 run failed on that: ``block3.5.attn.skip_scale`` eager AMP 1.2e-3, compiled 1.2e-2 from fp32,
while ``block3.8``'s compiled and eager AMP gradients differed by 0.13.

Even over a kind, one input's draw can be lucky: the thirty-ninth session's ``block4.2.attn.skip_scale`` (fp32 4.6e-6
from fp64, well resolved) was 4.5e-4 from fp32 in eager AMP and 1.2e-2 compiled, at 2x192x160, with every
``block4.*.attn.skip_scale`` of eager AMP within 1.5e-3; the forty-second session's H100 run gave the same numbers
again (the check is deterministic). So eager AMP's rounding noise is also sampled on ``AMP_DRAWS`` copies of the
input, each element moved by a relative ``PERTURBATION`` (2^-10, fp16's unit in the last place, so that fp16's
roundings fall anew), each copy's AMP gradients against that copy's own fp32 gradients (the maths moves with the input;
the rounding error is what is sampled). The bound is taken over the kind and the draws.

Some gradients are too ill-conditioned for 16-bit rounding to leave anything to compare. Each is also computed in
fp64 (eager, on the PyTorch reference path): how far fp32's own rounding moves it (eager fp32 against fp64) is its
conditioning in a number. A gradient that fp32 moves by more than ``ILL_CONDITIONED`` (1e-4, about 1000 times
fp32's epsilon) can be moved by its whole size by fp16, whose epsilon is 8192 times fp32's: its AMP errors say
nothing about the compiled code, so the AMP verdict leaves it out and names it. The thirty-ninth session's H100
run failed on one: ``skip_scale`` at 2x192x160, which fp32 alone moves by 9.5e-4 from fp64 (CPU, seed 100; 1e-4
to 2e-4 at 2x160x224); compiled AMP 4.6e-2 from eager fp32 there against eager AMP's 8.0e-3, a static compile
as much as a dynamic one. Such a gradient is judged in fp32 instead, where the compiled gradient may be
``FP32_NOISE_FACTOR`` times fp32's own error from eager (or 1e-3, whichever is larger).
"""
import copy
import os
import re
from unittest import mock

import torch

from mmgroupmamba.kernels.dispatch import IMPL_ENV

LOSS_SCALE = 2.0 ** 16
# A compiled AMP gradient may be this many times further from eager fp32 than eager AMP's (the sixteenth session
# measured up to 2.9x, always a skip_scale), or within FP32_FLOOR of it, whichever is larger.
AMP_FACTOR = 4.0
FP32_FLOOR = 1e-2
# Eager AMP's rounding noise is sampled on the input and this many perturbed copies of it (docstring).
AMP_DRAWS = 3
PERTURBATION = 2.0 ** -10
# A gradient that fp32's rounding alone moves further than this from fp64 is not judged under AMP (docstring).
ILL_CONDITIONED = 1e-4
# In fp32, a compiled gradient may be this many times fp32's own error (against fp64) from eager's, or within the
# fp32 bound (1e-3), whichever is larger.
FP32_NOISE_FACTOR = 4.0


def parameter_kind(name):
    """``name`` with its block's index within the stage left out: ``block3.5.attn.skip_scale`` ->
    ``block3.*.attn.skip_scale``. Parameters of one kind are computed by the same code over maps of one size."""
    return re.sub(r'^(block\d+)\.\d+\.', r'\1.*.', name)


def amp_bounds(eager_errors):
    """For each parameter (``{name: eager AMP's error against eager fp32}``), the largest error against eager fp32
    that its compiled AMP gradient may have: ``AMP_FACTOR`` times eager AMP's worst over the parameter's kind, or
    ``FP32_FLOOR``, whichever is larger."""
    worst = {}
    for name, err in eager_errors.items():
        kind = parameter_kind(name)
        worst[kind] = max(worst.get(kind, 0.0), err)
    return {name: max(AMP_FACTOR * worst[parameter_kind(name)], FP32_FLOOR) for name in eager_errors}


def perturbed_inputs(images, draws=AMP_DRAWS):
    """``draws`` copies of ``images``, each element moved by a relative ``PERTURBATION`` (normal, seeded): the same
    maths within rounding, fp16's roundings drawn anew."""
    generator = torch.Generator(images.device).manual_seed(1)
    return [images * (1 + PERTURBATION * torch.randn(images.shape, generator=generator, device=images.device,
                                                     dtype=images.dtype)) for _ in range(draws)]


def amp_errors(model, images, names, loss_fn=None):
    """``{name: eager AMP's relative error against eager fp32}`` for the gradients ``names`` on ``images``."""
    grads_amp = outputs_and_grads(model, images, True, loss_fn=loss_fn)[1]
    grads_fp32 = outputs_and_grads(model, images, False, loss_fn=loss_fn)[1]
    return {name: rel_err(grads_amp[name], grads_fp32[name]) for name in names}


def amp_noise(eager, images, first_errors, loss_fn=None):
    """For each parameter of ``first_errors`` (:func:`amp_errors` on ``images``), the largest such error over
    ``images`` and :func:`perturbed_inputs`, each copy against its own fp32 gradients."""
    draws = [amp_errors(eager, draw, first_errors, loss_fn) for draw in perturbed_inputs(images)]
    return {name: max([error] + [errors[name] for errors in draws]) for name, error in first_errors.items()}


def fp32_errors(grads_fp32, grads_fp64):
    """For each parameter, how far fp32's rounding moves its gradient: eager fp32 against eager fp64."""
    return {n: rel_err(g, grads_fp64[n]) for n, g in grads_fp32.items() if grads_fp64[n].norm() > 0}


def fp64_grads(model, images, loss_fn=None):
    """Parameter gradients of an fp64 copy of ``model`` (eager, the reference path), fp32 as the others are."""
    model64 = copy.deepcopy(model).double()
    # The reference path computes in any dtype: the fp64 gradients are the model's maths, not its Triton kernels'.
    with mock.patch.dict(os.environ, {IMPL_ENV: 'reference'}):
        return outputs_and_grads(model64, images.double(), False, loss_fn=loss_fn)[1]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(model, images, amp, loss_scale=LOSS_SCALE, loss_fn=None):
    """The outputs (fp32) and the parameter gradients (by name, fp32, unscaled) of one forward + backward of
    ``model``, under AMP fp16 when ``amp``. ``loss_fn(outs)``: default, every output element weighed by a fixed
    random number (a plain mean leaves most gradients at rounding noise)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        outs = model(images)
    if loss_fn is None:
        generator = torch.Generator(images.device).manual_seed(0)
        weights = [torch.randn(o.shape, generator=generator, device=o.device) for o in outs]
        loss = sum((o.float() * w).mean() for o, w in zip(outs, weights))
    else:
        loss = loss_fn(outs)
    scale = loss_scale if amp else 1.0
    (loss * scale).backward()
    grads = {name: p.grad.float() / scale for name, p in model.named_parameters() if p.grad is not None}
    return [o.detach().float() for o in outs], grads


class Comparison:
    """``compiled`` against ``eager`` on ``images``, fp32 or AMP fp16 (``amp``).

    Attributes: ``out_err`` (worst output), ``worst`` and ``grad_err`` (the parameter furthest from eager and its
    error), ``fp32_noise`` (each gradient's eager fp32 error against fp64: :func:`fp32_errors`) and
    ``ill_conditioned`` (those above ``ILL_CONDITIONED``), and under AMP ``against_fp32``: for every parameter,
    ``(eager AMP, compiled AMP)`` errors against eager fp32, ``amp_noise`` eager AMP's worst there over the input
    and its perturbed copies (:func:`amp_noise`), and ``amp_worst`` the judged parameter whose compiled error there
    is largest next to its bound."""

    def __init__(self, eager, compiled, images, amp, loss_fn=None):
        (outs_e, grads_e), (outs_c, grads_c) = (outputs_and_grads(m, images, amp, loss_fn=loss_fn)
                                                for m in (eager, compiled))
        self.amp = amp
        self.out_err = max(rel_err(c, e) for c, e in zip(outs_c, outs_e))
        self.errs = {n: rel_err(grads_c[n], grads_e[n]) for n in grads_e if n in grads_c and grads_e[n].norm() > 0}
        missing = sorted(set(grads_e) ^ set(grads_c))
        if missing:
            raise AssertionError(f'gradients of only one model: {missing[:5]}')
        self.worst = max(self.errs, key=self.errs.get)
        self.grad_err = self.errs[self.worst]
        grads_fp32 = outputs_and_grads(eager, images, False, loss_fn=loss_fn)[1] if amp else grads_e
        self.fp32_noise = fp32_errors(grads_fp32, fp64_grads(eager, images, loss_fn=loss_fn))
        self.ill_conditioned = {n: e for n, e in self.fp32_noise.items() if e > ILL_CONDITIONED}
        self.against_fp32 = self.amp_worst = None
        if amp:
            self.against_fp32 = {n: (rel_err(grads_e[n], grads_fp32[n]), rel_err(grads_c[n], grads_fp32[n]))
                                 for n in self.errs if grads_fp32[n].norm() > 0 and n not in self.ill_conditioned}
            self.amp_noise = amp_noise(eager, images, {n: e for n, (e, _) in self.against_fp32.items()}, loss_fn)
            self._bounds = amp_bounds(self.amp_noise)
            self.amp_worst = max(self.against_fp32, key=lambda n: self.against_fp32[n][1] / self.amp_bound(n))

    def amp_bound(self, name):
        """The largest error against eager fp32 that the compiled AMP gradient of ``name`` may have."""
        return self._bounds[name]

    def fp32_bound(self, name, fp32_grad=1e-3):
        """The largest error against eager that the compiled fp32 gradient of ``name`` may have."""
        return max(fp32_grad, FP32_NOISE_FACTOR * self.fp32_noise.get(name, 0.0))

    def ok(self, fp32_out=1e-4, fp32_grad=1e-3, amp_out=2e-2):
        if not self.amp:
            return self.out_err <= fp32_out and all(e <= self.fp32_bound(n, fp32_grad) for n, e in self.errs.items())
        return self.out_err <= amp_out and self.against_fp32[self.amp_worst][1] <= self.amp_bound(self.amp_worst)

    def __str__(self):
        text = f'outputs {self.out_err:.2e}, worst gradient {self.worst} {self.grad_err:.2e}'
        if not self.amp and self.grad_err > 1e-3:
            text += (f' (bound {self.fp32_bound(self.worst):.2e}: fp32 itself '
                     f'{self.fp32_noise.get(self.worst, 0.0):.2e} from fp64)')
        if self.amp:
            eager_err, compiled_err = self.against_fp32[self.amp_worst]
            kind = parameter_kind(self.amp_worst)
            kind_errs = [e for n, e in self.amp_noise.items() if parameter_kind(n) == kind]
            text += (f' (loss scaled by {LOSS_SCALE:g}); against eager fp32, closest to its bound: {self.amp_worst} '
                     f'eager AMP {eager_err:.2e} ({self.amp_noise[self.amp_worst]:.2e} at worst over the input and '
                     f'{AMP_DRAWS} perturbed copies), compiled AMP {compiled_err:.2e}, fp32 '
                     f'{self.fp32_noise.get(self.amp_worst, 0.0):.2e} from fp64 (bound '
                     f'{self.amp_bound(self.amp_worst):.2e}; eager AMP over {kind} and the copies: '
                     f'{min(kind_errs):.2e}..{max(kind_errs):.2e}, {len(kind_errs)} parameters)')
        if self.ill_conditioned:
            most = max(self.ill_conditioned, key=self.ill_conditioned.get)
            text += (f'; {len(self.ill_conditioned)} gradient(s) that fp32 alone moves by more than '
                     f'{ILL_CONDITIONED:g} from fp64{" (not judged under AMP)" if self.amp else ""}, most {most} '
                     f'{self.ill_conditioned[most]:.2e}')
        return text

"""``benchmarks/amp_noise.py``: eager AMP's rounding error against fp32, on an input and perturbed copies of it."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import amp_noise  # noqa: E402


def test_prints_each_matching_gradient_over_the_input_and_its_copies(capsys):
    errors = amp_noise.main(['--arch', 'mini', '--size', '1', '64', '64', '--draws', '2', '--match', r'skip_scale$'])
    out = capsys.readouterr().out
    assert set(errors) == {'block1.0.attn.skip_scale', 'block2.0.attn.skip_scale', 'block3.0.attn.skip_scale',
                           'block3.1.attn.skip_scale', 'block4.0.attn.skip_scale'}
    for name, errs in errors.items():
        assert len(errs) == 3 and all(0 < e < 10 for e in errs), (name, errs)
        assert f'| {name} | ' in out
    # the copies round differently from the input: not the same error three times
    assert any(len(set(errs)) > 1 for errs in errors.values())


def test_a_pattern_matching_nothing_fails_loudly():
    with pytest.raises(SystemExit):
        amp_noise.main(['--arch', 'mini', '--match', 'no_such_parameter'])

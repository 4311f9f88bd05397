"""``benchmarks/dwconv_pitch.py``: its direct launches at other row pitches do the launcher's work (Triton
interpreter), and its check catches a map that differs."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import dwconv_pitch  # noqa: E402


@pytest.mark.parametrize('pad', [8, 16, 64])
def test_each_pitch_writes_the_launchers_map_and_gradient(pad):
    x, weight, bias, dout = dwconv_pitch.inputs(1, 5, 6, 24, 'cpu')
    dwconv_pitch.check(x, weight, bias, dout, [pad])
    d_pre, out = dwconv_pitch.launch(x, weight, bias, dout, pad)
    assert out.shape == (1, 5, 6, 24 + pad) and out.is_contiguous()
    assert torch.equal(out[..., 24], torch.ones_like(out[..., 24]))
    _, no_map = dwconv_pitch.launch(x, weight, bias, dout, None)
    assert no_map is None


def test_check_raises_on_a_wrong_map(monkeypatch):
    launch = dwconv_pitch.launch

    def spoiled(x, weight, bias, dout, pad):
        d_pre, out = launch(x, weight, bias, dout, pad)
        if pad == 16:
            out[0, 0, 0, 3] += 1
        return d_pre, out

    monkeypatch.setattr(dwconv_pitch, 'launch', spoiled)
    with pytest.raises(AssertionError, match='pad 16: the recomputed map differs'):
        dwconv_pitch.check(*dwconv_pitch.inputs(1, 5, 6, 24, 'cpu'), [8, 16])

"""``benchmarks/conv_backward_guard.py`` counts the graphs torch.compile (symbolic sizes, Inductor) builds for a
strided conv's forward and backward over several input sizes, with a conv-free control: on the CPU, every case
runs and is counted, and the control and GroupMamba's OpaqueConv2d compile one graph for every size (whatever the
plain conv cases do, which depends on the torch release)."""
import re
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'conv_backward_guard.py'


def test_every_case_is_counted_and_the_control_compiles_once():
    result = subprocess.run([sys.executable, str(SCRIPT), '--sizes', '16x24', '24x16'], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(re.findall(r'^(.+): (\d+) graph\(s\) for 2 sizes$', result.stdout, re.M))
    assert set(counts) == {'input gradient', 'weight gradient only', 'no conv', 'input gradient, OpaqueConv2d',
                           'weight gradient only, OpaqueConv2d'}, result.stdout
    assert counts['no conv'] == counts['input gradient, OpaqueConv2d'] == '1'
    assert counts['weight gradient only, OpaqueConv2d'] == '1'
    assert all(1 <= int(n) <= 2 for n in counts.values()), counts
    assert result.stdout.startswith(f'torch {torch.__version__}, cpu'), result.stdout

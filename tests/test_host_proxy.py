"""``benchmarks/host_proxy.py`` times an eager training step's host work on the CPU, our Triton launches skipped
(counted): both models' rows, GroupMamba's launches counted, and the ATen operators and Python calls each step makes."""
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'host_proxy.py'


def test_both_models_are_timed_and_our_launches_counted():
    result = subprocess.run([sys.executable, str(SCRIPT), '--steps', '1'], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), int(m.group(3)), float(m.group(4)), int(m.group(5)), int(m.group(6)))
            for m in re.finditer(r'^\| (\S+) \| [\d.]+ \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \| [\d.]+ '
                                 r'\| (\d+) \| [\d.]+ \|$', result.stdout, re.M)}
    assert set(rows) == {'GroupMamba-T', 'Swin-T'}, result.stdout
    # GroupMamba-T's step launches our kernels (norms, scans, convs, affinities): at least two a block each way.
    assert rows['GroupMamba-T'][1] > 4 * 19 and rows['Swin-T'][1] == 0
    assert rows['Swin-T'][2] == 1.0 and rows['GroupMamba-T'][0] > 0
    # Operators: at least one per launch of ours (each launcher allocates its outputs), and Swin-T's step calls
    # at least its 12 blocks' four linear layers forward.
    assert rows['GroupMamba-T'][3] > rows['GroupMamba-T'][1] and rows['Swin-T'][3] > 48
    # Python calls: more than the operators (each is called from Python or from autograd's engine, and the
    # modules' forwards are Python calls of their own) for Swin-T; for GroupMamba-T, at least one per launch.
    assert rows['Swin-T'][4] > 48 and rows['GroupMamba-T'][4] > rows['GroupMamba-T'][1]

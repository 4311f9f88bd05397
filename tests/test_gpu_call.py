"""``benchmarks/gpu_call.sh`` refuses a step without its timeout before it prepares the machine (a call's start
and the stack's install are minutes of lent device time)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_call.sh'


def test_a_step_without_its_timeout_is_refused_before_the_setup(tmp_path):
    result = subprocess.run(['bash', str(SCRIPT), '100', '30 echo first', 'P="python3 x"; $P'],
                            env={'OUT': str(tmp_path), 'PATH': '/usr/bin:/bin'}, capture_output=True, text=True)
    assert result.returncode == 2, result
    assert "must start with its timeout" in result.stderr and 'P="python3 x"' in result.stderr
    assert not list(tmp_path.iterdir())  # no log, no card: nothing was set up

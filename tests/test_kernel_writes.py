"""``benchmarks/kernel_writes.py``: torch.compile copies no input of any Triton launcher before launching it
(its functionalization clones every tensor a kernel may write, and decides which from the kernel's TTIR), and
no kernel writes through views (cloned and scattered back). Before the scan's and the channel affinity's
helpers were split, the scan's ``A_logs`` and delta bias and the affinity's four weights were copied at every
launch; before the partial sums were passed as whole buffers, the norms' and the scan's were scattered. The
script runs in its own process: conftest.py turns on Triton's interpreter, whose kernels have no TTIR."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'kernel_writes.py'


def test_no_launcher_input_is_copied_under_torch_compile():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip('|').split(' | ')] for line in result.stdout.splitlines()
            if line.startswith('| ')][2:]
    rows = {name: tuple(found) for name, *found in rows}
    # The control: a kernel whose read-only input is marked written through a helper. The analysis sees it.
    assert rows.pop('control: a read-only scale behind a helper') == ('_scaled_copy_kernel: S', 'none')
    assert len(rows) == 10, rows
    assert all(found == ('none', 'none') for found in rows.values()), rows

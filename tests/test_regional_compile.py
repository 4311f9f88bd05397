"""``benchmarks/regional_compile.py`` compiles GroupMamba block by block: one graph per block shape, and one more
for the later blocks of a stage (they add their predecessor's residual branch; the mini arch's stage 3 has two
blocks), the same results as eager. Run in its own process: compiled code is cached per process. The times it
prints are the GPU's business."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'regional_compile.py'


def test_blocks_of_one_shape_share_a_graph_and_match_eager():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, str(SCRIPT), '--mode', 'regional', '--arch', 'mini', '--batch', '1',
                             '--size', '64', '64', '--steps', '1', '--device', 'cpu'],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r'(\d+) graphs compiled; against eager: outputs (\S+), worst gradient \S+ (\S+)',
                      result.stdout)
    assert found, result.stdout[-2000:]
    graphs, out_err, grad_err = int(found.group(1)), float(found.group(2)), float(found.group(3))
    # mini: depths 1, 1, 2, 1 in four shapes; stage 3's second block takes the first's pending residual add.
    assert graphs == 5
    assert out_err < 1e-5 and grad_err < 1e-3

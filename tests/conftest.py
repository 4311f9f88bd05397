import os
import sys
from pathlib import Path

# The CPU test suite runs the Triton kernels through Triton's interpreter. Triton binds interpreter mode when it
# is first imported (its own library functions are jit'd then), and other tests' imports (mmdet, mmpretrain,
# torch extensions) can import it first, so it is set here, before any test module is collected.
os.environ.setdefault('TRITON_INTERPRET', '1')

# Test helpers (the float64 scan oracle) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

import sys
from pathlib import Path

# Test helpers (the float64 scan oracle, generated data) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

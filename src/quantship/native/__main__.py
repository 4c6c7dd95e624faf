"""`python -m quantship.native`: build the native kernels now (make setup does), print whether they work."""

import sys

from . import available, unavailable_reason

if available():
    print("quantship native kernels: built and loaded")
else:
    print(f"quantship native kernels unavailable: {unavailable_reason()} (torch's kernels are used)")
sys.exit(0)

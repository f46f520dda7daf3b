"""Optional compiled kernels (Triton). Importing this package never fails: `triton_moe` is None without Triton."""
from __future__ import annotations

try:
    from . import triton_moe
except ImportError:  # Triton not installed (e.g. macOS, or a CPU-only install without the test extra)
    triton_moe = None

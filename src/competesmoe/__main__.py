"""`python -m competesmoe ...` (what `torchrun -m competesmoe ...` runs on every process)."""
import sys

from .cli import main

sys.exit(main())

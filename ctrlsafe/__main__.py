"""`python -m ctrlsafe ...` (what torchrun launches)."""
import sys

from .cli import main

sys.exit(main())

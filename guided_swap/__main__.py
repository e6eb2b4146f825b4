"""``python -m guided_swap ...`` is the guided-swap command (and what torchrun runs with ``-m guided_swap``)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m mamba_jax.generation``: the command line (same as ``python -m mamba_jax.generate``)."""

import sys

from mamba_jax.generation.cli import main

sys.exit(main())

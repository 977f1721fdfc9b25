"""``python -m mamba_jax.generate``: the generation command line (:mod:`mamba_jax.generation.cli`).

This module is only run, never imported: ``mamba_jax.generate`` is the function
:func:`mamba_jax.generation.generate`, and importing a module of the same name
would replace it. Import from :mod:`mamba_jax.generation` instead.
"""

import sys

if __name__ != "__main__":
    raise ImportError(
        "mamba_jax.generate is the command line (python -m mamba_jax.generate) and is not imported: "
        "the function is mamba_jax.generate (from mamba_jax import generate); sampling, GenerationConfig "
        "and the CLI's main are in mamba_jax.generation"
    )

from mamba_jax.generation.cli import main  # noqa: E402

sys.exit(main())

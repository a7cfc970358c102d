"""qspjax: a differentiable QSP model of NSCLC under radiotherapy and checkpoint inhibitors.

Importing the package turns on float64 in JAX; every number in the model is double precision.
"""

import jax

jax.config.update("jax_enable_x64", True)

from qspjax.errors import QSPValidationError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["QSPValidationError", "__version__"]

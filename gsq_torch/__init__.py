"""gsq-torch: 2-bit GSQ (Humming uint2) Mixture-of-Experts models in plain PyTorch.

Importing the package registers the ``torch.ops.gsq`` custom ops.
"""

from . import format, ops  # noqa: F401  (ops registers torch.ops.gsq.*)

__version__ = "0.1.0"

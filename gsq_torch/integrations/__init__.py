"""Integrations with other libraries; importing this package registers the transformers quantizer."""

from . import transformers  # noqa: F401  (registers quant_method "humming" with transformers)

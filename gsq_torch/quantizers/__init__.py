"""Quantizers: round-to-nearest, GPTQ and GSQ, and the layer-by-layer pipeline that drives them."""

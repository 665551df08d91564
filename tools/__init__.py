"""Tools on top of the runtime that need PyTorch: benchmarks, the report, the per-precision accuracy report, backend
parity, FLOP counts.

Not part of what a renderer embeds (that is :mod:`cvvae.runtime`); installed with the ``torch`` extra.
"""

"""Training and evaluation of CV-VAE models (spec 8-9): the image VAE, inflation into a video VAE, the latent-
regularized loss, data (photos, video clips, synthesized motion), the resumable trainer, image-decoder compatibility
and whole-clip evaluation; ``cvvae train`` / ``cvvae compat`` (:mod:`cvvae.training.cli`).

The top layer (docs/architecture.md): it builds on the core model and is imported by nothing that deployment runs.
Everything here needs PyTorch (the ``torch`` extra).
"""

"""The CV-VAE runtime: ``VideoVAE`` over the torch, onnxruntime and tensorrt backends (video I/O: :mod:`cvvae.video_io`)."""

from .api import Latents, VideoVAE, to_pixels
from .backends import available_backends

__all__ = ["Latents", "VideoVAE", "available_backends", "to_pixels"]

"""cvvae-deploy: CV-VAE (arXiv 2405.20279) from the PyTorch reference to ONNX, TensorRT and a streaming runtime.

Public API of the reference side; the runtime lives in :mod:`cvvae.runtime`, export in :mod:`cvvae.export`.
"""

from .config import PRESETS, ModelConfig, preset
from .errors import BackendUnavailableError, CheckpointError, CVVAEError, InputError
from .loading import create_model, load_model, save_model
from .model import CVVAE, DiagonalGaussian, EncodeResult
from .plan import PlanSettings, VideoPlan, make_plan

__version__ = "0.1.0"

__all__ = [
    "CVVAE", "PRESETS", "BackendUnavailableError", "CVVAEError", "CheckpointError", "DiagonalGaussian",
    "EncodeResult", "InputError", "ModelConfig", "PlanSettings", "VideoPlan", "create_model", "load_model",
    "make_plan", "preset", "save_model",
]

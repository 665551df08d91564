"""Typed errors of the toolkit, all of them, in the bottom layer (docs/architecture.md): every error raised on purpose
is a :class:`CVVAEError`, so a caller catches the toolkit's errors with one class and the CLI prints them as one line.
Errors of wrong input are also ``ValueError``s, errors of a missing backend or a failed job ``RuntimeError``s.
Each message names the offending thing, what was expected, and the fix."""

from __future__ import annotations


class CVVAEError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class CheckpointError(CVVAEError, ValueError):
    """A checkpoint that cannot be found, read, or matched to the model."""


class InputError(CVVAEError, ValueError):
    """User input (tensor, file, option) with the wrong shape, type or content."""


class BackendUnavailableError(CVVAEError, RuntimeError):
    """An inference backend whose package or device is missing."""


class ExportError(CVVAEError, RuntimeError):
    """An export that cannot be done or did not verify, or an export directory that cannot be read."""


class IntegrityError(CVVAEError, RuntimeError):
    """A file whose sha256 differs from the one recorded when it was written, or a manifest naming a file outside
    its folder: it is not loaded."""


class ResourceError(CVVAEError, RuntimeError):
    """A job that needs more memory than this machine has available (the message gives the estimate)."""


class NonFiniteError(CVVAEError, FloatingPointError):
    """NaN or Inf in an input, or produced by a component (e.g. fp16 overflow): stopped instead of writing garbage."""


# ----- core: config, plan, video files ----------------------------------------------------------------------------
class ConfigError(CVVAEError, ValueError):
    """A model config that cannot describe a supported CV-VAE."""


class PlanError(CVVAEError, ValueError):
    """Plan settings or an input shape the plan cannot handle."""


class VideoError(InputError):
    """A video could not be read or written, or the arguments do not fit the video."""


# ----- engines ------------------------------------------------------------------------------------------------------
class StaleEngineError(CVVAEError, RuntimeError):
    """An engine built for another TensorRT version, GPU or ONNX graph (or without a sidecar)."""


class EngineDirError(CVVAEError, ValueError):
    """An engine directory that is missing, unreadable or lacks the requested engine."""


class EngineBuildError(CVVAEError, RuntimeError):
    """An engine that could not be planned or built (the message carries TensorRT's own errors)."""


class ProfileError(CVVAEError, ValueError):
    """A profile or profile spec that is malformed or does not fit the graph."""


class ShapeOutsideProfileError(CVVAEError, ValueError):
    """An input shape that no optimization profile of the engine contains."""


# ----- dataset encoding, training -----------------------------------------------------------------------------------
class DatasetError(InputError):
    """A manifest, clip policy or output folder that cannot be used as it is."""


class DataError(InputError):
    """Training data that cannot be read, is too small for the crops, or overlaps the held-out clips."""


class TrainingError(CVVAEError, RuntimeError):
    """Training that cannot go on (non-finite loss, missing stage input)."""


# ----- deploy -------------------------------------------------------------------------------------------------------
class DeployError(CVVAEError, RuntimeError):
    """A ``cvvae deploy`` step that failed (the message names the step and why); later steps did not run."""

"""Typed errors of the toolkit. Each message names the offending thing, what was expected, and the fix."""

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


class DeployError(CVVAEError, RuntimeError):
    """A ``cvvae deploy`` step that failed (the message names the step and why); later steps did not run."""

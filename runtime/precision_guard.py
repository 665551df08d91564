"""``--precision auto``'s accuracy check: bf16 is kept only if its first tile agrees with fp32 (issue 16).

:func:`cvvae.precision.resolve_precision` picks bf16 where the hardware has it; for a checkpoint whose bf16 accuracy
is not recorded, :class:`Bf16Guard` computes the first tile the job runs (encoder or decoder) in both bf16 and
fp32, and when the two differ by more than :data:`cvvae.precision.MIN_BF16_PSNR_DB` it switches the job to fp32
(keeping the fp32 result), logging a warning that says why. The fp32 copy of the weights is dropped once bf16 passed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from ..precision import MIN_BF16_PSNR_DB, PrecisionChoice, peak_psnr
from .backends import TorchBackend

log = logging.getLogger(__name__)


class Bf16Guard:
    """A torch backend in bf16 whose first tile is checked against fp32 (the Backend interface of backends.py)."""

    name = "torch"

    def __init__(self, fp32: TorchBackend, choice: PrecisionChoice, min_psnr_db: float = MIN_BF16_PSNR_DB) -> None:
        self.fp32: TorchBackend | None = fp32
        self.bf16 = TorchBackend(copy.deepcopy(fp32.model).to(torch.bfloat16), "bf16")
        self.active = self.bf16
        self.choice = choice
        self.min_psnr_db = min_psnr_db
        self.checked_psnr_db: float | None = None

    def __getattr__(self, name: str) -> Any:  # config, identity, plan_settings, device, model
        return getattr(self.active, name)

    @property
    def precision(self) -> str:
        return self.active.precision

    def _check(self, component: str, x: Any) -> Any:
        test = getattr(self.bf16, component)(x)
        reference = getattr(self.fp32, component)(x)
        z = reference.shape[1] // 2  # the encoder's moments: compare the means
        ref, out = (reference, test) if component == "decoder" else (reference[:, :z], test[:, :z])
        self.checked_psnr_db = peak_psnr(ref, out)
        if self.checked_psnr_db < self.min_psnr_db:
            log.warning("precision auto: bf16 %s of the first tile is %.1f dB from fp32 (< %.0f dB): this "
                        "checkpoint loses accuracy in bf16, running fp32", component, self.checked_psnr_db,
                        self.min_psnr_db)
            self.active = self.fp32
            self.choice = PrecisionChoice("auto", "fp32", f"{self.choice.reason}; bf16 first tile "
                                                          f"{self.checked_psnr_db:.1f} dB from fp32, below "
                                                          f"{self.min_psnr_db:g} dB: fell back to fp32")
            self.bf16 = None
            return reference
        log.info("precision auto: bf16 first tile %.1f dB from fp32: keeping bf16", self.checked_psnr_db)
        self.choice = PrecisionChoice("auto", "bf16", f"{self.choice.reason}; bf16 first tile "
                                                      f"{self.checked_psnr_db:.1f} dB from fp32")
        self.fp32 = None
        return test

    def encoder(self, video: Any) -> Any:
        return self._check("encoder", video) if self.checked_psnr_db is None else self.active.encoder(video)

    def decoder(self, latent: Any) -> Any:
        return self._check("decoder", latent) if self.checked_psnr_db is None else self.active.decoder(latent)

"""Training: the run config (TOML), the three stages, and one generic, resumable training loop.

Stages (``stage`` in the TOML file):

* ``image``: an :class:`~cvvae.training.image_vae.ImageVAE` from scratch on photos and single video frames, with
  :class:`ImageLoss` (L1 + a small KL + an optional gradient/edge L1; no LPIPS or GAN: no such weights offline).
* ``video``: a CV-VAE v1 inflated from the trained image VAE (:func:`.inflate.inflate`, spec 9), fine-tuned
  with :class:`~.losses.LatentRegularizedLoss` whose frozen image decoder keeps the latents decodable by the
  image VAE (spec 8).
* ``video-noreg``: the same fine-tune with ``rec2d_weight = 0`` (the ablation).

:class:`Trainer` knows nothing of VAEs: it runs a :class:`TrainTask` (model + loss + one step + a reconstruction for
validation) with AdamW, gradient clipping, a warmup + cosine schedule, periodic validation and atomic checkpoints.

Resumability: batch ``i`` and the posterior noise of step ``i`` are pure functions of ``(seed, i)``; a checkpoint
holds the model, the loss parameters, the optimizer, the schedule, the RNG states, the step, the sampler state and
the elapsed time. A run killed at any moment (``kill -9`` included) continues from its last checkpoint and, without a
time budget, takes exactly the steps an uninterrupted run would. With ``max_minutes`` the schedule's progress is
``max(step / max_steps, elapsed / max_minutes)``, so the learning rate reaches its floor when either budget ends.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from ..durations import format_duration
from ..errors import CheckpointError, InputError, TrainingError
from ..fsutil import atomic_path
from ..metrics import psnr, ssim_video
from ..model import DiagonalGaussian
from .data import EVAL_CLIPS, DataConfig, TrainSampler, load_eval_clip

log = logging.getLogger(__name__)

Stage = Literal["image", "video", "video-noreg"]
STAGES: tuple[str, ...] = ("image", "video", "video-noreg")
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"  # flock held while a process trains in the run dir (released by the OS even on kill -9)
RESULT_NAME = "result.json"
METRICS_NAME = "metrics.jsonl"
EXPORT_NAME = "final"  # run_dir/final: the trained weights (image VAE or CV-VAE folder)


# ----- configuration ----------------------------------------------------------------------------------------
def _from_table(cls, table: Mapping[str, Any], section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InputError(f"unknown [{section}] keys {unknown}; known keys: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


@dataclass(frozen=True)
class ModelSection:
    """What is trained. Image stage: ``image_preset`` + ``image_overrides``. Video stages: start from ``init``
    (a CV-VAE folder) or inflate ``inflate_from`` (an image VAE folder)."""

    image_preset: str = "tiny-image"
    image_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    inflate_from: str | None = None
    cvvae_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for inflate()


@dataclass(frozen=True)
class LossConfig:
    """``kl_weight`` multiplies the KL summed over latent elements, relative to the L1 summed over pixels (SD's
    convention: 1e-6). ``edge_weight``: L1 of image gradients (image stage). ``image_vae``, ``rec2d_weight``,
    ``mapping``, ``learn_logvar``: the latent regularisation of the video stages (spec 8.2)."""

    kl_weight: float = 1e-6
    edge_weight: float = 0.0
    image_vae: str | None = None
    rec2d_weight: float = 1.0
    mapping: str = "random"
    learn_logvar: bool = True


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", *AUTOCAST_DTYPES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that run bfloat16 natively


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it oneDNN emulates bf16 and
    autocast is slower than fp32 (an AVX2-only EPYC); unknown (no /proc/cpuinfo) counts as absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_autocast(autocast: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where the device computes it natively (CPU flags above, or a CUDA GPU that supports
    it), else ``fp32``; ``fp32``/``bf16`` are returned unchanged (an explicit choice is obeyed)."""
    if autocast != "auto":
        return autocast
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)  # spec 8.3
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of lr


@dataclass(frozen=True)
class BudgetConfig:
    max_steps: int = 1000
    max_minutes: float | None = None  # wall time of the stage, summed over resumes


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out clips reconstructed every ``every_steps`` steps or ``every_minutes`` minutes (0 / None: never)."""

    clips: tuple[str, ...] = EVAL_CLIPS
    frames: int = 17
    height: int = 128
    every_steps: int = 0
    every_minutes: float | None = 10.0
    at_start: bool = False  # also before the first step (the starting point of a fine-tune)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    every_minutes: float = 2.0
    snapshot_minutes: tuple[float, ...] = ()  # also keep the model weights at these elapsed times


@dataclass(frozen=True)
class TrainConfig:
    name: str
    stage: Stage
    seed: int = 0
    threads: int = 1
    log_every: int = 20
    # "bf16": forward passes under torch.autocast (bfloat16 convolutions and matmuls, fp32 weights, optimizer and
    # losses). About 2.4x faster per step on CPUs with AVX512-BF16; validation and exported weights stay fp32.
    # "auto": bf16 where the CPU has native bf16 (resolve_autocast), else fp32 (emulated bf16 is slower).
    autocast: str = "fp32"
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"stage={self.stage!r}; expected one of {', '.join(STAGES)}")
        if self.threads < 1:
            raise InputError(f"threads={self.threads} must be >= 1")
        if self.autocast not in AUTOCAST_CHOICES:
            raise InputError(f"autocast={self.autocast!r}; expected one of {', '.join(AUTOCAST_CHOICES)}")

    SECTIONS = {"model": ModelSection, "loss": LossConfig, "optim": OptimConfig, "budget": BudgetConfig,
                "validation": ValidationConfig, "checkpoint": CheckpointConfig}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        top = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        unknown = sorted(set(tables) - set(cls.SECTIONS) - {"data"})
        if unknown:
            raise InputError(f"unknown config tables {unknown}; known: {sorted(cls.SECTIONS) + ['data']}")
        kw: dict[str, Any] = {name: _from_table(sc, tables.get(name, {}), name) for name, sc in cls.SECTIONS.items()}
        kw["data"] = DataConfig.from_dict(tables.get("data", {}))
        known = {"name", "stage", "seed", "threads", "log_every", "autocast"}
        bad = sorted(set(top) - known)
        if bad:
            raise InputError(f"unknown top-level config keys {bad}; known: {sorted(known)}")
        if "stage" not in top:
            raise InputError(f"config has no stage; set stage = one of {', '.join(STAGES)}")
        top.setdefault("name", top["stage"])
        return cls(**top, **kw)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"training config {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{path} is not valid TOML: {e}") from e
        return cls.from_dict(data)

    def with_overrides(self, **sections: Mapping[str, Any]) -> "TrainConfig":
        """Replace fields: ``top={...}`` for top-level keys, ``budget={...}``, ``data={...}``, ..."""
        cfg = dataclasses.replace(self, **sections.pop("top", {}))
        for name, changes in sections.items():
            if changes:
                cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **changes)})
        return cfg

    def as_dict(self) -> dict[str, Any]:
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))


# ----- losses of the image stage ----------------------------------------------------------------------------
def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of (..., H, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class ImageLoss(nn.Module):
    """``mean|x - xrec| + edge_weight * mean|grad x - grad xrec| + kl_weight * KL / (3 H W)``.

    Dividing the summed KL by the pixel count keeps SD's ratio (KL weight relative to the summed L1).
    """

    def __init__(self, kl_weight: float = 1e-6, edge_weight: float = 0.0) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.edge_weight = edge_weight

    def forward(self, x: torch.Tensor, xrec: torch.Tensor,
                posterior: DiagonalGaussian) -> tuple[torch.Tensor, dict[str, float]]:
        rec = (x - xrec).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * kl
        logs = {"l1": rec.item(), "kl": kl.item() * x[0].numel()}
        if self.edge_weight:
            (gx, gy), (rx, ry) = image_gradients(x), image_gradients(xrec)
            edge = 0.5 * ((gx - rx).abs().mean() + (gy - ry).abs().mean())
            loss = loss + self.edge_weight * edge
            logs["edge"] = edge.item()
        return loss, logs


# ----- tasks ------------------------------------------------------------------------------------------------
class TrainTask(Protocol):
    """What :class:`Trainer` trains: ``model`` and ``loss`` (either may own parameters)."""

    model: nn.Module
    loss: nn.Module

    def step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float],
                                                                                 torch.Tensor]:
        """(loss, scalar logs, reconstruction of ``batch``) for one training batch (B,3,T,H,W)."""

    def reconstruct(self, clip: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction of a (1,3,T,H,W) clip for validation (no grad)."""

    def export(self, folder: Path) -> None:
        """Write the trained model for use outside training."""


class ImageStage:
    """Train an image VAE on T=1 batches: frames (B,3,1,H,W) are images (B,3,H,W)."""

    def __init__(self, model: nn.Module, loss: ImageLoss) -> None:
        self.model, self.loss = model, loss

    def step(self, batch, generator):
        if batch.shape[2] != 1:
            raise TrainingError(f"the image stage trains on T=1 batches; got {tuple(batch.shape)} "
                                "(set data.schedule = 'images')")
        x = batch[:, :, 0]
        xrec, posterior = self.model(x, sample_posterior=True, generator=generator)
        loss, logs = self.loss(x, xrec, posterior)
        return loss, logs, xrec.unsqueeze(2)

    @torch.no_grad()
    def reconstruct(self, clip):
        frames = clip[0].transpose(0, 1)  # (T,3,H,W)
        out = self.model.decode(self.model.encode(frames).mode())
        return out.transpose(0, 1).unsqueeze(0)

    def export(self, folder):
        from .image_vae import save_image_vae

        save_image_vae(self.model, folder, overwrite=True)


class VideoStage:
    """Fine-tune a CV-VAE with the latent-regularised loss (spec 8.1): sample z, decode in 3D, constrain in 2D."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        self.model, self.loss = model, loss

    def step(self, batch, generator):
        # .float(): under autocast the losses (sums over every pixel and latent) are still taken in fp32
        posterior = DiagonalGaussian.from_moments(self.model.encoder(batch).float())
        z = posterior.sample(generator)
        xrec = self.model.decoder(z).float()
        loss, logs = self.loss(batch, xrec, z, posterior, generator=generator)
        return loss, logs, xrec

    @torch.no_grad()
    def reconstruct(self, clip):
        enc = self.model.encode(clip)
        return self.model.decode(enc.mean, num_frames=enc.num_frames, height=enc.height, width=enc.width)

    def export(self, folder):
        from ..loading import save_model

        save_model(self.model, folder, overwrite=True)


def _resolve(path: str | None, base: Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def build_task(config: TrainConfig, *, base_dir: Path | None = None) -> TrainTask:
    """Model and loss of the configured stage. Relative paths in the config are taken from ``base_dir``."""
    torch.manual_seed(config.seed)
    if config.stage == "image":
        from .image_vae import ImageVAE, image_preset

        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.image_overrides.items()}
        model = ImageVAE(image_preset(config.model.image_preset).replace(**overrides))
        return ImageStage(model, ImageLoss(config.loss.kl_weight, config.loss.edge_weight))

    from .image_vae import load_image_vae
    from .losses import LatentRegularizedLoss

    init = _resolve(config.model.init, base_dir)
    inflate_from = _resolve(config.model.inflate_from, base_dir)
    if init is not None:
        from ..loading import load_model

        model = load_model(init)
    elif inflate_from is not None:
        from .inflate import inflate

        model = inflate(load_image_vae(inflate_from), variant="v1", fold_quant_convs=True,
                        **config.model.cvvae_overrides)
    else:
        raise TrainingError(f"stage {config.stage} needs [model] init (a CV-VAE folder) or inflate_from "
                            "(an image VAE folder)")
    model.train()
    rec2d_weight = 0.0 if config.stage == "video-noreg" else config.loss.rec2d_weight
    image_vae_path = _resolve(config.loss.image_vae, base_dir)
    image_decoder = None
    if image_vae_path is not None:
        image_decoder = load_image_vae(image_vae_path).requires_grad_(False).eval()
    elif rec2d_weight:
        raise TrainingError(f"stage {config.stage} with rec2d_weight={rec2d_weight} needs [loss] image_vae "
                            "(the frozen image VAE whose decoder constrains the latents)")
    loss = LatentRegularizedLoss(image_decoder, mapping=config.loss.mapping, kl_weight=config.loss.kl_weight,
                                 rec2d_weight=rec2d_weight, learn_logvar=config.loss.learn_logvar)
    return VideoStage(model, loss)


# ----- schedule, metrics, RNG ---------------------------------------------------------------------------------
@dataclass
class CosineSchedule:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_ratio`` over training progress in [0, 1]."""

    warmup_steps: int
    min_ratio: float

    def factor(self, step: int, progress: float) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = min(max(progress, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator of one step (posterior noise, random frame mapping): a function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ----- checkpoints ------------------------------------------------------------------------------------------
def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """torch.save into a temporary sibling, fsync, then os.replace: a kill at any moment leaves the old file."""
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}; delete it to restart the run") from e


def load_trained_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a video run at its last checkpoint, so a run that is still training can be evaluated.

    ``path``: a run directory (its ``final`` export when the run finished, else its ``checkpoint.pt``), a checkpoint
    file, or a CV-VAE folder. The checkpoint's architecture comes from the run's ``[model] init`` folder. Returns
    the fp32 model in eval mode and ``{"source", "step", "elapsed_s"}``.
    """
    from ..loading import load_model

    path = Path(path)
    if path.is_dir() and (path / "config.json").exists() and not (path / CHECKPOINT_NAME).exists():
        return load_model(path).float().eval(), {"source": str(path), "step": None, "elapsed_s": None}
    if path.is_dir() and (path / RESULT_NAME).exists() and (path / EXPORT_NAME / "config.json").exists():
        result = json.loads((path / RESULT_NAME).read_text())
        return load_model(path / EXPORT_NAME).float().eval(), {"source": str(path / EXPORT_NAME),
                                                               "step": result["step"], "elapsed_s": result["elapsed_s"]}
    ckpt = path / CHECKPOINT_NAME if path.is_dir() else path
    if not ckpt.exists():
        raise CheckpointError(f"{path} is neither a CV-VAE folder, a training run directory nor a checkpoint")
    state = read_checkpoint(ckpt)
    config = state["config"]
    init = config.get("model", {}).get("init")
    if config.get("stage") not in ("video", "video-noreg") or not init:
        raise CheckpointError(f"{ckpt} is not a video fine-tune started from an [model] init folder; export its "
                              "weights by finishing the run")
    if not Path(init).exists():
        raise CheckpointError(f"{ckpt}: its start model {init} (the architecture) is missing")
    model = load_model(init)
    model.load_state_dict(state["model"])
    return model.float().eval(), {"source": str(ckpt), "step": int(state["step"]),
                                  "elapsed_s": float(state["elapsed_s"])}


# ----- the loop ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    elapsed_s: float
    finished: bool
    validation: dict[str, Any] = field(default_factory=dict)
    export: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """Runs a :class:`TrainTask` on batches of a :class:`TrainSampler` in ``run_dir``.

    ``on_step(step, record)`` is called after every step with the step's scalars (tests use it to interrupt).
    """

    def __init__(self, task: TrainTask, config: TrainConfig, run_dir: str | Path, sampler: TrainSampler, *,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.task, self.config, self.sampler = task, config, sampler
        self.run_dir = Path(run_dir)
        self.on_step = on_step
        params = [p for m in (task.model, task.loss) for p in m.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("nothing to train: the task has no parameter with requires_grad")
        self.params = params
        o = config.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.schedule = CosineSchedule(o.warmup_steps, o.min_lr_ratio)
        self.step = 0
        self.elapsed_s = 0.0
        self.progress = 0.0
        self.snapshots_done: list[float] = []
        self._val_clips: dict[str, torch.Tensor] | None = None

    # paths
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    # state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "progress": self.progress,
            "model": self.task.model.state_dict(),
            "loss": self.task.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"warmup_steps": self.schedule.warmup_steps, "min_ratio": self.schedule.min_ratio,
                          "lr": self.optimizer.param_groups[0]["lr"]},
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "snapshots_done": list(self.snapshots_done),
            "config": self.config.as_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["config"].get("stage") != self.config.stage:
            raise CheckpointError(f"checkpoint in {self.run_dir} is of stage {state['config'].get('stage')!r}, "
                                  f"not {self.config.stage!r}; use another --run-dir")
        self.task.model.load_state_dict(state["model"])
        self.task.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"])
        self.progress = float(state["progress"])
        self.snapshots_done = list(state.get("snapshots_done", []))

    def save_checkpoint(self) -> None:
        write_checkpoint(self.checkpoint_path, self.state_dict())
        log.debug("checkpoint at step %d -> %s", self.step, self.checkpoint_path)

    def maybe_resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        self.load_state_dict(read_checkpoint(self.checkpoint_path))
        log.info("resumed %s at step %d (%s of training done)", self.run_dir, self.step, format_duration(self.elapsed_s))
        return True

    # budget
    def _progress(self, elapsed: float) -> float:
        b = self.config.budget
        p = self.step / max(b.max_steps, 1)
        if b.max_minutes:
            p = max(p, elapsed / (60.0 * b.max_minutes))
        return p

    def _budget_left(self, elapsed: float) -> bool:
        b = self.config.budget
        if self.step >= b.max_steps:
            return False
        return not (b.max_minutes and elapsed >= 60.0 * b.max_minutes)

    # validation
    def validate(self) -> dict[str, Any]:
        v = self.config.validation
        if self._val_clips is None:
            self._val_clips = {name: load_eval_clip(name, frames=v.frames, height=v.height) for name in v.clips}
        model = self.task.model
        was_training = model.training
        model.eval()
        out: dict[str, Any] = {}
        try:
            for name, clip in self._val_clips.items():
                rec = self.task.reconstruct(clip)
                rec = rec.clamp(-1, 1)
                out[name] = {"psnr": round(psnr(clip, rec), 3), "ssim": round(ssim_video(clip, rec)[0], 4)}
        finally:
            model.train(was_training)
        if out:
            out["mean_psnr"] = round(float(np.mean([r["psnr"] for r in out.values()])), 3)
            out["mean_ssim"] = round(float(np.mean([r["ssim"] for r in out.values() if isinstance(r, dict)])), 4)
        return out

    def _record(self, event: str, **fields: Any) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps({"event": event, "step": self.step, "elapsed_s": round(self.elapsed_s, 1),
                                **fields}) + "\n")

    def _lock(self):
        """Exclusive flock on run_dir/.lock: two processes training into one run dir would overwrite each other."""
        f = open(self.run_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise TrainingError(f"another process (pid {owner}) is training in {self.run_dir}; wait for it or "
                                "stop it (it checkpoints on SIGTERM) before starting this one") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    # main loop
    def fit(self, *, resume: bool = True) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        try:
            return self._fit(resume=resume)
        finally:
            lock.close()

    def _fit(self, *, resume: bool) -> TrainResult:
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        if resume:
            if self.maybe_resume():
                self._record("resume")
        elif self.checkpoint_path.exists():
            raise CheckpointError(f"{self.checkpoint_path} exists; resume it, or choose an empty --run-dir")
        (self.run_dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")

        ck, val = cfg.checkpoint, cfg.validation
        session_start = time.monotonic()
        elapsed0, progress0 = self.elapsed_s, self._progress(self.elapsed_s)
        last_ckpt = last_val = time.monotonic()
        window: dict[str, list[float]] = {}
        window_start, window_samples, window_frames = time.monotonic(), 0, 0
        bad_steps = 0
        precision = resolve_autocast(cfg.autocast)
        dtype = AUTOCAST_DTYPES[precision]
        log.info("forward passes in %s (autocast = %r; native CPU bf16: %s)", precision, cfg.autocast,
                 cpu_has_native_bf16())
        self._record("precision", autocast=cfg.autocast, precision=precision)
        self.task.model.train()
        if val.at_start and self.step == 0 and val.clips:
            self._run_validation()
        try:
            while self._budget_left(self.elapsed_s):
                batch = self.sampler.batch(self.step)
                self.sampler.next_step = self.step + 1
                self.progress = self._progress(self.elapsed_s)
                lr = cfg.optim.lr * self.schedule.factor(self.step, self.progress)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(batch.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss, logs, xrec = self.task.step(batch, step_generator(cfg.seed, self.step))
                self.optimizer.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    bad_steps += 1
                    log.warning("step %d: non-finite loss %s; skipped (%d in a row)", self.step, loss.item(),
                                bad_steps)
                    if bad_steps >= 5:
                        raise TrainingError(f"5 non-finite losses in a row at step {self.step}; lower optim.lr "
                                            f"(now {cfg.optim.lr}) and restart from the last checkpoint")
                else:
                    bad_steps = 0
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                    self.optimizer.step()
                    logs = {"loss": loss.item(), **logs, "psnr": psnr(batch, xrec.detach().clamp(-1, 1)),
                            "grad_norm": float(grad_norm)}
                self.step += 1
                now = time.monotonic()
                self.elapsed_s = elapsed0 + (now - session_start)
                for k, v in logs.items():
                    window.setdefault(k, []).append(v)
                window_samples += batch.shape[0]
                window_frames += batch.shape[0] * batch.shape[2]
                if self.on_step is not None:
                    self.on_step(self.step, {"lr": lr, **logs})

                if self.step % cfg.log_every == 0 or not self._budget_left(self.elapsed_s):
                    dt = max(now - window_start, 1e-9)
                    means = {k: float(np.mean(v)) for k, v in window.items()}
                    self._log_progress(means, lr, window_samples / dt, window_frames / dt,
                                       self._eta(now - session_start, progress0))
                    self._record("train", lr=lr, samples_per_s=round(window_samples / dt, 3),
                                 **{k: round(v, 5) for k, v in means.items()})
                    window, window_start, window_samples, window_frames = {}, now, 0, 0

                for minutes in ck.snapshot_minutes:
                    if minutes not in self.snapshots_done and self.elapsed_s >= 60.0 * minutes:
                        self._snapshot(minutes)
                if (val.every_steps and self.step % val.every_steps == 0) or \
                        (val.every_minutes and now - last_val >= 60.0 * val.every_minutes):
                    self._run_validation()
                    last_val = time.monotonic()
                if (ck.every_steps and self.step % ck.every_steps == 0) or \
                        (ck.every_minutes and now - last_ckpt >= 60.0 * ck.every_minutes):
                    self.elapsed_s = elapsed0 + (time.monotonic() - session_start)
                    self.save_checkpoint()
                    last_ckpt = time.monotonic()
        except KeyboardInterrupt:
            self.elapsed_s = elapsed0 + (time.monotonic() - session_start)
            self.save_checkpoint()
            log.warning("interrupted at step %d; checkpoint saved to %s", self.step, self.checkpoint_path)
            raise
        self.elapsed_s = elapsed0 + (time.monotonic() - session_start)
        self.save_checkpoint()
        result = TrainResult(self.step, round(self.elapsed_s, 1), finished=True)
        result.validation = self._run_validation() if val.clips else {}
        export = self.run_dir / EXPORT_NAME
        self.task.export(export)
        result.export = str(export)
        (self.run_dir / RESULT_NAME).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        log.info("finished %s at step %d after %s; weights in %s", cfg.name, self.step, format_duration(self.elapsed_s),
                 export)
        return result

    def _eta(self, session_s: float, progress0: float) -> float | None:
        done = self._progress(self.elapsed_s)
        rate = (done - progress0) / max(session_s, 1e-9)
        return (1.0 - done) / rate if rate > 0 else None

    def _log_progress(self, means: Mapping[str, float], lr: float, samples_s: float, frames_s: float,
                      eta: float | None) -> None:
        b = self.config.budget
        extra = " ".join(f"{k} {v:.4g}" for k, v in means.items() if k not in ("loss", "psnr", "grad_norm"))
        log.info("step %d/%d | loss %.4f | psnr %.2f dB | lr %.2e | %.2f samples/s %.1f frames/s | %s | "
                 "elapsed %s | eta %s", self.step, b.max_steps, means.get("loss", float("nan")),
                 means.get("psnr", float("nan")), lr, samples_s, frames_s, extra, format_duration(self.elapsed_s),
                 "?" if eta is None else format_duration(eta))

    def _run_validation(self) -> dict[str, Any]:
        t0 = time.monotonic()
        result = self.validate()
        if result:
            per_clip = ", ".join(f"{k} {v['psnr']:.2f}" for k, v in result.items() if isinstance(v, dict))
            log.info("validation at step %d: mean PSNR %.2f dB, SSIM %.4f (%s) [%.1fs]", self.step,
                     result["mean_psnr"], result["mean_ssim"], per_clip, time.monotonic() - t0)
            self._record("validation", **result)
        return result

    def _snapshot(self, minutes: float) -> None:
        folder = self.run_dir / "snapshots" / f"{minutes:g}min-step{self.step}"
        self.task.export(folder)
        self.snapshots_done.append(minutes)
        self._record("snapshot", minutes=minutes, path=str(folder))
        log.info("snapshot after %g minutes (step %d) -> %s", minutes, self.step, folder)


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = True, base_dir: Path | None = None,
          sampler: TrainSampler | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Build the stage's task and data, and run (or continue) it in ``run_dir``."""
    run_dir = Path(run_dir)
    done = run_dir / RESULT_NAME
    if resume and done.exists():
        previous = json.loads(done.read_text())
        b = config.budget
        more_steps = previous["step"] < b.max_steps
        more_time = b.max_minutes is None or previous["elapsed_s"] < 60.0 * b.max_minutes
        if not (more_steps and more_time):
            log.info("%s already finished (step %d); nothing to do", run_dir, previous["step"])
            return TrainResult(**previous)
        done.unlink()
    torch.set_num_threads(config.threads)
    task = build_task(config, base_dir=base_dir)
    sampler = sampler or TrainSampler(config.data)
    return Trainer(task, config, run_dir, sampler, on_step=on_step).fit(resume=resume)

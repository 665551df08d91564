"""Load and save CV-VAE checkpoints as released (spec sections 1, 3, 4, 7 and 11).

Accepted sources:

* a diffusers-layout folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or a parent
  folder with one ``vae3d*`` subfolder (``subfolder=`` picks one when there are several);
* a single ``.safetensors`` / ``.pt`` / ``.bin`` / ``.ckpt`` file (a Lightning ``state_dict`` wrapper and a common
  prefix such as ``model.`` are stripped; training-only keys ``loss.*``, ``constraint_decoder.*``, ``model_ema.*`` are
  reported and ignored), with the config from a ``config.json`` beside it, a preset, or inferred from the shapes;
* ``random:PRESET``: the preset's architecture with random weights (benchmarks, tests).

v1 keys load as they are (our module tree equals the official one); SD3 also accepts diffusers' legacy attention
names. Any missing, unexpected or mis-shaped key fails the load with one error that lists them all.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig, preset as get_preset
from .default_model import DEFAULT_MODEL_DIR
from .errors import BackendUnavailableError, CheckpointError, InputError
from .fsutil import atomic_path, sha256_file
from .memory import check_model_fits
from .model import CVVAE

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRAINING_ONLY_PREFIXES = ("loss.", "constraint_decoder.", "model_ema.", "discriminator.", "lpips.")
RANDOM_PREFIX = "random:"
_SD3_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class CheckpointInfo:
    """Where a model came from: recorded in manifests and latent files."""

    source: str
    sha256: str | None
    config_source: str
    ignored_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "config_source": self.config_source,
                "ignored_keys": len(self.ignored_keys)}


def _resolve_folder(folder: Path, subfolder: str | None) -> Path:
    if subfolder:
        folder = folder / subfolder
        if not folder.is_dir():
            raise CheckpointError(f"subfolder {subfolder!r} not found in {folder.parent}")
    if (folder / "config.json").exists() and any((folder / n).exists() for n in WEIGHT_NAMES):
        return folder
    candidates = sorted(p for p in folder.glob("vae3d*") if p.is_dir() and (p / "config.json").exists())
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise CheckpointError(f"{folder} holds several CV-VAE subfolders ({names}); choose one with subfolder=NAME")
    raise CheckpointError(
        f"{folder} is not a CV-VAE checkpoint folder: expected config.json and one of {', '.join(WEIGHT_NAMES)} "
        "(or a vae3d* subfolder holding them)"
    )


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch pickle (unwrapping ``state_dict``)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(
            f"{path} is not a checkpoint: it is neither safetensors nor a torch zip/pickle file (it starts with "
            f"{head!r}); pass a CV-VAE folder, a .safetensors file or a torch .pt/.ckpt"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        hint = "" if trust_pickle or "Weights only load failed" not in str(e) else (
            "; if it is a trusted Lightning checkpoint with pickled extras, pass trust_pickle=True "
            "(CLI: --trust-checkpoint)"
        )
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {e}{hint}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def normalize_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the prefix before ``encoder.``/``decoder.`` and drop training-only keys; return (model keys, ignored)."""
    anchor = next((k for k in sd if k.endswith("encoder.conv_in.weight") and "constraint" not in k), None)
    if anchor is None:
        anchor = next((k for k in sd if k.endswith("decoder.conv_in.weight") and "constraint" not in k), None)
    if anchor is None:
        raise CheckpointError(
            "no encoder.conv_in.weight or decoder.conv_in.weight in the checkpoint; this is not a CV-VAE state_dict "
            f"(first keys: {', '.join(list(sd)[:5])})"
        )
    prefix = anchor[: anchor.index("coder.conv_in.weight") - 2]
    kept, ignored = {}, []
    for key, value in sd.items():
        if key.startswith(prefix) and not key[len(prefix):].startswith(TRAINING_ONLY_PREFIXES):
            kept[key[len(prefix):]] = value
        else:
            ignored.append(key)
    for key in list(kept):  # SD3 legacy attention names (diffusers' _from_deprecated_attn_block)
        m = re.match(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            kept[f"{m.group(1)}{_SD3_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"] = kept.pop(key)
    if ignored:
        log.info("ignoring %d keys that are not part of the inference model (e.g. %s)", len(ignored), ignored[0])
    return kept, ignored


# variant -> (prefix of encoder level i, the preset its other settings come from)
_LEVEL_PREFIXES = {"sd3": ("encoder.down_blocks.{}.resnets.", "cvvae-sd3"), "v1": ("encoder.down.{}.block.", "cvvae-v1")}


def infer_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Architecture from tensor names and shapes (for a bare state_dict without config.json or preset)."""
    for level_prefix, preset_name in _LEVEL_PREFIXES.values():
        if level_prefix.format(0) + "0.conv1.weight" not in sd:
            continue
        widths = []
        while level_prefix.format(len(widths)) + "0.conv1.weight" in sd:
            widths.append(sd[level_prefix.format(len(widths)) + "0.conv1.weight"].shape[0])
        layers = len({k[len(level_prefix.format(0)):].split(".")[0] for k in sd if k.startswith(level_prefix.format(0))})
        return get_preset(preset_name).replace(widths=tuple(widths), layers_per_block=layers,
                                               latent_channels=sd["decoder.conv_in.weight"].shape[1])
    raise CheckpointError("cannot infer the architecture from the checkpoint keys; give a config.json or a preset")


def check_keys(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
                       for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {title}: {shown}")
        raise CheckpointError(
            f"checkpoint {source} does not match the {model.config.variant} architecture "  # type: ignore[union-attr]
            f"(widths {list(model.config.widths)}): " + "; ".join(parts)  # type: ignore[union-attr]
            + ". Check the variant/preset or the config.json that goes with these weights."
        )


def torch_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or an error that says why not (unknown name, no CUDA in this build, no such GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise BackendUnavailableError(
                f"device {device!r}: this PyTorch build ({torch.__version__}) has no CUDA support; use --device cpu "
                "or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise BackendUnavailableError(f"device {device!r}: no CUDA GPU is visible; use --device cpu")
        if (dev.index or 0) >= count:
            raise BackendUnavailableError(f"device {device!r}: only {count} CUDA GPU(s) are visible "
                                          f"(cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def create_model(config: ModelConfig | str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> CVVAE:
    """A model with random weights (deterministic for a seed), for benchmarks and tests."""
    cfg = get_preset(config) if isinstance(config, str) else config
    device = torch_device(device)
    check_model_fits(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CVVAE(cfg)
    model.checkpoint_info = CheckpointInfo(f"{RANDOM_PREFIX}{config if isinstance(config, str) else 'config'}",
                                           None, "preset")
    return model.to(device=device, dtype=dtype).eval()


def load_model(path: str | Path | None = None, *, preset: str | None = None, config: ModelConfig | None = None,
               subfolder: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_pickle: bool = False) -> CVVAE:
    """Load a CV-VAE from a folder, a weights file, ``random:PRESET``, or (``path=None``) the built-in default model."""
    device = torch_device(device)
    if path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise CheckpointError(
                f"no built-in default model at {DEFAULT_MODEL_DIR}; pass --model PATH (a CV-VAE checkpoint folder "
                "or file)"
            )
        path = DEFAULT_MODEL_DIR
    text = str(path)
    if text.startswith(RANDOM_PREFIX):
        return create_model(config or text[len(RANDOM_PREFIX):], dtype=dtype, device=device)
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a CV-VAE folder or a .safetensors/.ckpt file")
    config_source = "argument"
    if path.is_dir():
        folder = _resolve_folder(path, subfolder)
        weights = next(folder / n for n in WEIGHT_NAMES if (folder / n).exists())
        if config is None and preset is None:
            config, config_source = ModelConfig.from_json_file(folder / "config.json"), str(folder / "config.json")
    else:
        weights = path
        beside = path.parent / "config.json"
        if config is None and preset is None and beside.exists():
            config, config_source = ModelConfig.from_json_file(beside), str(beside)
    if config is None and preset is not None:
        config, config_source = get_preset(preset), f"preset {preset}"
    if config is not None:
        check_model_fits(config)  # before reading the weights
    sd, ignored = normalize_state_dict(read_state_dict(weights, trust_pickle=trust_pickle))
    if config is None:
        config, config_source = infer_config(sd), "inferred from tensor shapes"
        check_model_fits(config)
    model = CVVAE(config)
    check_keys(model, sd, str(weights))
    model.load_state_dict(sd)
    model.checkpoint_info = CheckpointInfo(str(weights), sha256_file(weights), config_source, ignored)
    log.info("loaded %s (%s, %d parameters) from %s", config.variant, config_source, model.num_parameters(), weights)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: CVVAE, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write the official diffusers layout (config.json + diffusion_pytorch_model.safetensors), atomically."""
    folder = Path(folder)
    with atomic_path(folder, overwrite=overwrite, directory=True, kind="model") as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_official_dict(), indent=2) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        (tmp / WEIGHT_NAMES[0]).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    return folder

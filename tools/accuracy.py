"""Accuracy of every precision of an export, through the runtime (``cvvae accuracy``).

For each clip and each precision (fp32, fp16, int8: those the manifest lists), the clip runs through
:class:`cvvae.runtime.VideoVAE` on ONNX Runtime CPU with the export's chunk/tile plan, and three things are compared:

* **encoder**: latent mean and logvar against the fp32 encoder's (max/mean/p99 abs error);
* **decoder**: the fp32 latents decoded by this precision's decoder, against the fp32 decode and the input frames;
* **round trip**: this precision's encoder then decoder, against the fp32 round trip and the input frames.

Pixel metrics: PSNR on [-1, 1] data (range 2, equal to PSNR on [0, 1]), SSIM on [0, 1] floats with a Gaussian
11x11 window (:func:`cvvae.metrics.ssim_video`), max abs error, and the *PSNR drop*: PSNR(fp32 vs input) - PSNR(this
vs input).
Output directory (written atomically): ``report.md``, ``report.json``, ``per_frame_psnr.png`` and
``side_by_side.png`` (one frame: input, fp32, the lowest precision, and its error map against fp32).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cvvae.errors import InputError

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class AccuracyConfig:
    """Which precisions, which frames of each clip, and how the runtime runs them."""

    precisions: tuple[str, ...] = PRECISION_ORDER   # those missing from the export are skipped (and reported)
    max_frames: int = 17
    start: int = 0
    stride: int = 1
    size: tuple[int, int] | None = None             # resize to exactly (H, W)
    resize_short_side: int | None = 128
    center_crop: tuple[int, int] | None = None
    plan_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None                      # ONNX Runtime intra-op threads

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISION_ORDER]
        if unknown or "fp32" not in self.precisions:
            raise InputError(f"precisions must include fp32 (the reference) and be among {PRECISION_ORDER}, "
                             f"got {list(self.precisions)}")
        if self.max_frames < 1:
            raise InputError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.size is not None and self.resize_short_side is not None:
            object.__setattr__(self, "resize_short_side", None)  # an exact size wins

    def read_kwargs(self) -> dict[str, Any]:
        return {"start": self.start, "stride": self.stride, "max_frames": self.max_frames, "size": self.size,
                "resize_short_side": self.resize_short_side, "center_crop": self.center_crop}


def _finite(v: float) -> float | None:
    return None if v is None or math.isinf(v) or math.isnan(v) else round(float(v), 6)


@dataclass
class Row:
    """One (clip, precision, component) comparison."""

    clip: str
    precision: str
    component: str                      # encoder | decoder | round_trip
    vs_fp32: dict[str, Any]
    vs_input: dict[str, Any] | None
    per_frame_psnr_vs_input: list[float] = field(default_factory=list)
    per_frame_psnr_vs_fp32: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "precision": self.precision, "component": self.component,
                "vs_fp32": self.vs_fp32, "vs_input": self.vs_input,
                "per_frame_psnr_vs_input": [_finite(v) for v in self.per_frame_psnr_vs_input],
                "per_frame_psnr_vs_fp32": [_finite(v) for v in self.per_frame_psnr_vs_fp32]}


def _pixel_metrics(candidate: torch.Tensor, reference: torch.Tensor, *, ssim: bool = True) -> dict[str, Any]:
    from cvvae.compare import compare
    from cvvae.metrics import SSIM_WINDOW, ssim_video

    stats = compare(candidate, reference, output="video")
    out = {"psnr": _finite(stats.psnr), "max_abs": _finite(stats.max_abs), "mean_abs": _finite(stats.mean_abs),
           "p99_abs": _finite(stats.p99_abs)}
    if ssim:
        big_enough = min(candidate.shape[3:]) >= SSIM_WINDOW
        out["ssim"] = _finite(ssim_video(candidate, reference)[0]) if big_enough else None
    return out


def _latent_metrics(candidate: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    from cvvae.compare import compare

    stats = compare(candidate, reference, output="latent")
    rms_ref = float(reference.double().pow(2).mean().sqrt())
    rmse = float((candidate.double() - reference.double()).pow(2).mean().sqrt())
    return {"max_abs": _finite(stats.max_abs), "mean_abs": _finite(stats.mean_abs), "p99_abs": _finite(stats.p99_abs),
            "relative_rmse": _finite(rmse / rms_ref) if rms_ref > 0 else None}


@dataclass
class AccuracyReport:
    export: str
    model: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    clips: list[dict[str, Any]]
    rows: list[Row]
    skipped_precisions: dict[str, str]
    seconds: float = 0.0
    figures: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Mean over clips per (precision, component)."""
        out = []
        keys = list(dict.fromkeys((r.precision, r.component) for r in self.rows))
        for precision, component in keys:
            rows = [r for r in self.rows if r.precision == precision and r.component == component]

            def mean(getter: Callable[[Row], Any]) -> float | None:
                values = [getter(r) for r in rows]
                values = [v for v in values if v is not None]
                return _finite(float(np.mean(values))) if values else None

            entry: dict[str, Any] = {"precision": precision, "component": component, "clips": len(rows)}
            if component == "encoder":
                entry.update(mean_max_abs=mean(lambda r: r.vs_fp32["mean"]["max_abs"]),
                             logvar_max_abs=mean(lambda r: r.vs_fp32["logvar"]["max_abs"]),
                             mean_relative_rmse=mean(lambda r: r.vs_fp32["mean"]["relative_rmse"]))
            else:
                entry.update(psnr_vs_fp32=mean(lambda r: r.vs_fp32["psnr"]),
                             ssim_vs_fp32=mean(lambda r: r.vs_fp32.get("ssim")),
                             max_abs_vs_fp32=_finite(max(r.vs_fp32["max_abs"] or 0.0 for r in rows)),
                             psnr_vs_input=mean(lambda r: r.vs_input["psnr"]),
                             ssim_vs_input=mean(lambda r: r.vs_input.get("ssim")),
                             psnr_drop_db=mean(lambda r: r.vs_input["psnr_drop_db"]))
            out.append(entry)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"export": self.export, "model": self.model, "plan": self.plan, "config": self.config,
                "clips": self.clips, "summary": self.summary(), "rows": [r.as_dict() for r in self.rows],
                "skipped_precisions": self.skipped_precisions, "figures": self.figures,
                "seconds": round(self.seconds, 2)}

    def int8_round_trip_drop(self) -> float | None:
        """Mean PSNR drop of the INT8 round trip against fp32 (vs the input frames), or None without int8."""
        for s in self.summary():
            if s["precision"] == "int8" and s["component"] == "round_trip":
                return s["psnr_drop_db"]
        return None


def measure(export_dir: str | Path, clips: Sequence[str | Path], config: AccuracyConfig | None = None, *,
            on_progress: Callable[[str], None] | None = None) -> tuple[AccuracyReport, dict[str, Any]]:
    """Run the comparisons; returns the report and the tensors of one frame for the side-by-side figure."""
    from cvvae.calibration.data import describe_clips, find_clips
    from cvvae.export.manifest import load_manifest
    from cvvae.metrics import psnr_per_frame
    from cvvae.runtime import VideoVAE
    from cvvae.runtime.api import to_pixels
    from cvvae.video_io import read_video

    config = config or AccuracyConfig()
    say = on_progress or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    manifest = load_manifest(export_dir)
    available = [p for p in PRECISION_ORDER if p in config.precisions
                 and all(p in manifest.precisions(c) for c in ("encoder", "decoder"))]
    skipped = {p: "not in the export's manifest" for p in config.precisions if p not in available}
    if "fp32" not in available:
        raise InputError(f"{export_dir} has no fp32 encoder and decoder; the report compares against them")
    clip_paths = find_clips(clips)

    def load(precision: str) -> VideoVAE:
        return VideoVAE.load(export_dir, backend="onnxruntime", precision=precision, threads=config.threads,
                             plan_overrides=config.plan_overrides or None)

    # fp32 first: its latents and round trips are the references. One precision's sessions at a time (ONNX
    # Runtime's arenas keep their peak: three precisions loaded together need three times the memory).
    vae = load("fp32")
    settings = vae.settings.as_dict()
    clip_info: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    for clip, described in zip(clip_paths, describe_clips(clip_paths)):
        frames, _ = read_video(clip, **config.read_kwargs())
        frames = torch.from_numpy(frames)  # torch in, torch out: the metrics below are torch functions
        x = to_pixels(frames)
        t, h, w = x.shape[2:]
        plan = vae.plan(t, h, w)
        clip_info.append({**described.as_dict(), "frames_used": t, "size_used": [h, w],
                          "plan": {"encode_chunks": len(plan.encode_chunks), "decode_chunks": len(plan.decode_chunks),
                                   "tiles": plan.num_tiles}})
        say(f"{clip.name}: {t} frames at {h}x{w} ({plan.num_tiles} tiles, {len(plan.encode_chunks)} encode chunks)")
        latents = vae.encode(frames)
        video = vae.decode(latents)
        refs.append({"clip": clip.name, "frames": frames, "x": x, "latents": latents, "video": video,
                     "psnr_in": _pixel_metrics(video, x, ssim=False)["psnr"]})
    del vae
    _release_memory()
    rows: list[Row] = []
    frame_sample: dict[str, Any] = {}
    low = available[-1]
    for p in available:
        vae = load(p) if p != "fp32" else None
        for ref in refs:
            x, ref_latents, ref_video = ref["x"], ref["latents"], ref["video"]
            latents = ref_latents if vae is None else vae.encode(ref["frames"])
            decoded = ref_video if vae is None else vae.decode(ref_latents)
            round_trip = ref_video if vae is None else vae.decode(latents)
            rows.append(Row(ref["clip"], p, "encoder",
                            {"mean": _latent_metrics(latents.mean, ref_latents.mean),
                             "logvar": _latent_metrics(latents.logvar, ref_latents.logvar)}, None))
            for component, video in (("decoder", decoded), ("round_trip", round_trip)):
                vs_in = _pixel_metrics(video, x)
                vs_in["psnr_drop_db"] = (_finite(ref["psnr_in"] - vs_in["psnr"])
                                         if vs_in["psnr"] is not None and ref["psnr_in"] is not None else None)
                rows.append(Row(ref["clip"], p, component, _pixel_metrics(video, ref_video), vs_in,
                                psnr_per_frame(video, x), psnr_per_frame(video, ref_video)))
            say(f"  {ref['clip']} {p}: round trip {rows[-1].vs_input['psnr']:.2f} dB vs input, "
                f"{rows[-1].vs_fp32['psnr'] or float('inf'):.2f} dB vs fp32")
            if p == low and not frame_sample:
                k = x.shape[2] // 2
                frame_sample = {"clip": ref["clip"], "frame": k, "precision": low, "input": x[0, :, k],
                                "fp32": ref_video[0, :, k], "low": round_trip[0, :, k]}
        del vae
        _release_memory()
    report = AccuracyReport(
        export=str(Path(export_dir).resolve()),
        model={"variant": manifest.variant, "checkpoint": manifest.checkpoint, "config_summary": manifest.config_summary},
        plan=settings,
        config={**{k: v for k, v in config.__dict__.items()}, "precisions_measured": available},
        clips=clip_info, rows=rows, skipped_precisions=skipped, seconds=time.perf_counter() - started)
    return report, frame_sample


def _release_memory() -> None:
    """Hand freed session memory back to the OS (glibc keeps it otherwise), so precisions do not add up."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def write_report(report: AccuracyReport, frame_sample: dict[str, Any], out_dir: str | Path, *,
                 overwrite: bool = False) -> Path:
    """report.md, report.json, per_frame_psnr.png, side_by_side.png in ``out_dir`` (atomically)."""
    from cvvae.fsutil import atomic_path

    out_dir = Path(out_dir)
    with atomic_path(out_dir, overwrite=overwrite, directory=True, kind="report") as tmp:
        report.figures = {"per_frame_psnr": "per_frame_psnr.png", "side_by_side": "side_by_side.png"}
        plot_per_frame(report, tmp / "per_frame_psnr.png")
        plot_side_by_side(frame_sample, tmp / "side_by_side.png")
        (tmp / "report.json").write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(report))
    return out_dir


def accuracy_report(export_dir: str | Path, clips: Sequence[str | Path], out_dir: str | Path,
                    config: AccuracyConfig | None = None, *, overwrite: bool = False,
                    on_progress: Callable[[str], None] | None = None) -> AccuracyReport:
    """Measure and write the report directory; returns the report."""
    from cvvae.fsutil import check_writable_target

    check_writable_target(Path(out_dir), overwrite=overwrite, what="report directory", kind="report")
    report, sample = measure(export_dir, clips, config, on_progress=on_progress)
    write_report(report, sample, out_dir, overwrite=overwrite)
    return report


# ----- figures and text ---------------------------------------------------------------------------------------
def _pyplot():
    from cvvae.extras import lazy_import

    matplotlib = lazy_import("matplotlib", "the accuracy report's figures")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


STYLES = {"fp32": dict(color="black", linestyle="-"), "fp16": dict(color="tab:blue", linestyle="--"),
          "int8": dict(color="tab:red", linestyle=":", marker=".")}


def plot_per_frame(report: AccuracyReport, path: Path) -> None:
    """Round-trip PSNR per frame: against the input (top row) and against fp32 (bottom row), one column per clip."""
    plt = _pyplot()
    clips = list(dict.fromkeys(r.clip for r in report.rows))
    fig, axes = plt.subplots(2, len(clips), figsize=(4.2 * len(clips), 6), squeeze=False)
    for j, clip in enumerate(clips):
        for r in (r for r in report.rows if r.clip == clip and r.component == "round_trip"):
            frames = np.arange(len(r.per_frame_psnr_vs_input))
            axes[0][j].plot(frames, r.per_frame_psnr_vs_input, label=r.precision, **STYLES[r.precision])
            if r.precision != "fp32":
                axes[1][j].plot(frames, r.per_frame_psnr_vs_fp32, label=r.precision, **STYLES[r.precision])
        axes[0][j].set_title(clip, fontsize=9)
        axes[0][j].set_ylabel("PSNR vs input (dB)")
        axes[1][j].set_ylabel("PSNR vs fp32 (dB)")
        axes[1][j].set_xlabel("frame")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.suptitle("round trip PSNR per frame (ONNX Runtime CPU, runtime chunk/tile plan)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_side_by_side(sample: dict[str, Any], path: Path) -> None:
    """Input | fp32 | lowest precision | |lowest - fp32| (and |fp32 - input| for scale)."""
    plt = _pyplot()

    def rgb(t: torch.Tensor) -> np.ndarray:
        return ((t.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    err_low = (sample["low"] - sample["fp32"]).abs().mean(0).numpy()
    err_fp32 = (sample["fp32"] - sample["input"]).abs().mean(0).numpy()
    low = sample["precision"]
    height, width = err_low.shape
    fig, axes = plt.subplots(1, 5, figsize=(20, max(2.0, 3.6 * height / width) + 1.0))
    panels = [(rgb(sample["input"]), "input"), (rgb(sample["fp32"]), "fp32 round trip"),
              (rgb(sample["low"]), f"{low} round trip")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
    vmax = max(float(err_low.max()), 1e-6)
    im = axes[3].imshow(err_low, cmap="inferno", vmin=0, vmax=vmax)
    axes[3].set_title(f"|{low} - fp32| (max {vmax:.3f})", fontsize=9)
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    im = axes[4].imshow(err_fp32, cmap="inferno", vmin=0, vmax=max(float(err_fp32.max()), 1e-6))
    axes[4].set_title(f"|fp32 - input| (max {float(err_fp32.max()):.3f})", fontsize=9)
    fig.colorbar(im, ax=axes[4], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{sample['clip']}, frame {sample['frame']} (errors: mean over RGB, pixels in [-1, 1])",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "inf" if v is None else format(v, spec)


def markdown(report: AccuracyReport) -> str:
    lines = [f"# Accuracy of `{report.export}`", "",
             f"Model: {report.model['variant']}, checkpoint `{report.model['checkpoint'].get('source')}` "
             f"(sha256 {str(report.model['checkpoint'].get('sha256'))[:16]}). Runtime: ONNX Runtime CPU through "
             f"`VideoVAE`, plan {report.plan}. Frames: {report.config['max_frames']} per clip, "
             f"resize {report.config.get('size') or report.config.get('resize_short_side')}.", ""]
    if report.skipped_precisions:
        lines += [f"Skipped: {', '.join(f'{p} ({why})' for p, why in report.skipped_precisions.items())}", ""]
    summary = report.summary()
    lines += ["## Pixels (mean over clips)", "",
              "| precision | component | PSNR vs fp32 | SSIM vs fp32 | max abs vs fp32 | PSNR vs input | SSIM vs input "
              "| PSNR drop vs fp32 |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["component"] == "encoder":
            continue
        lines.append(f"| {s['precision']} | {s['component']} | {_fmt(s['psnr_vs_fp32'])} | "
                     f"{_fmt(s['ssim_vs_fp32'], '.4f')} | {_fmt(s['max_abs_vs_fp32'], '.3g')} | "
                     f"{_fmt(s['psnr_vs_input'])} | {_fmt(s['ssim_vs_input'], '.4f')} | "
                     f"{_fmt(s['psnr_drop_db'], '+.3f')} dB |")
    lines += ["", "PSNR on pixels in [-1, 1] (range 2); SSIM: Gaussian 11x11 window on [0, 1] floats; "
              "*decoder* = fp32 latents decoded by "
              "this precision; *round trip* = this precision's encoder and decoder; PSNR drop = PSNR(fp32 vs input) "
              "- PSNR(this vs input).", "",
              "## Latents (encoder vs fp32, mean over clips)", "",
              "| precision | mean: max abs | mean: relative RMSE | logvar: max abs |", "|---|---|---|---|"]
    for s in summary:
        if s["component"] == "encoder":
            lines.append(f"| {s['precision']} | {_fmt(s['mean_max_abs'], '.3g')} | "
                         f"{_fmt(s['mean_relative_rmse'], '.3g')} | {_fmt(s['logvar_max_abs'], '.3g')} |")
    lines += ["", "## Per clip (round trip)", "",
              "| clip | frames | size | precision | PSNR vs input | SSIM vs input | PSNR vs fp32 | max abs vs fp32 |",
              "|---|---|---|---|---|---|---|---|"]
    info = {c["path"].rsplit("/", 1)[-1]: c for c in report.clips}
    order = list(info)
    for r in sorted((r for r in report.rows if r.component == "round_trip"),
                    key=lambda r: (order.index(r.clip) if r.clip in order else 0, PRECISION_ORDER.index(r.precision))):
        c = info.get(r.clip, {})
        lines.append(f"| {r.clip} | {c.get('frames_used')} | {'x'.join(map(str, c.get('size_used', [])))} | "
                     f"{r.precision} | {_fmt(r.vs_input['psnr'])} | {_fmt(r.vs_input.get('ssim'), '.4f')} | "
                     f"{_fmt(r.vs_fp32['psnr'])} | {_fmt(r.vs_fp32['max_abs'], '.3g')} |")
    lines += ["", "![per-frame PSNR](per_frame_psnr.png)", "", "![side by side](side_by_side.png)", "",
              f"Measured in {report.seconds:.1f} s.", ""]
    return "\n".join(lines)

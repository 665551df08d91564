"""A reconstruction report: one offline HTML page comparing the original video with each backend's reconstruction.

``build_report`` encodes and decodes the same clip with each target (torch fp32, ONNX Runtime fp32/fp16/int8 where
the export has those graphs) through :class:`cvvae.runtime.VideoVAE`, and writes into one directory:

* ``index.html``: the numbers (PSNR, SSIM, errors against the original and against the first target, timings), a
  per-frame PSNR/SSIM plot, and for a few frames the original, each reconstruction and its error heat map side by side;
* ``images/*.png``: those frames, heat maps (|original - reconstruction| averaged over RGB, in [0, 1] pixel units,
  colour-mapped from 0 to ``heat_max``), the colour bar and the plot;
* ``report.json``: the same numbers as data.

No scripts, fonts or styles are loaded from anywhere: the page works offline. The directory is written atomically.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cvvae.errors import BackendUnavailableError, InputError
from cvvae.fsutil import atomic_path
from cvvae.metrics import SSIM_WINDOW, psnr, psnr_per_frame, ssim_video, to_uint8_frames
from cvvae.tools.bench import Target, onnx_export_for

log = logging.getLogger(__name__)

DEFAULT_REPORT_TARGETS = ("torch:fp32", "torch:bf16", "onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ReportConfig:
    """What goes into a report. ``read_kwargs`` select frames as in ``cvvae reconstruct`` (max_frames, size, ...)."""

    targets: tuple[str, ...] = DEFAULT_REPORT_TARGETS
    read_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_frames": 17})
    shown_frames: int = 4
    heat_max: float | None = None  # None: the 99th percentile of the first target's errors, rounded up (1-2-5)
    threads: int | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        targets = [Target.parse(t) for t in self.targets]
        if any(t.backend == "reference" for t in targets):
            raise InputError("a report compares runtime targets (torch:fp32, onnxruntime:fp16, ...), not 'reference'")
        if not targets:
            raise InputError("no targets for the report")
        if self.shown_frames < 1:
            raise InputError(f"shown_frames={self.shown_frames} must be at least 1")
        if self.heat_max is not None and not 0 < self.heat_max <= 1:
            raise InputError(f"heat_max={self.heat_max} must be in (0, 1] (pixel units), or None for automatic")


@dataclass
class TargetResult:
    """Quality and timing of one target's reconstruction."""

    target: str
    psnr: float
    ssim: float
    max_abs: float
    mean_abs: float
    psnr_vs_first: float | None
    max_abs_vs_first: float | None
    encode_s: float
    decode_s: float
    psnr_per_frame: list[float]
    ssim_per_frame: list[float]
    images: dict[int, dict[str, str]] = field(default_factory=dict)  # frame -> {"recon": path, "heat": path}


@dataclass
class Report:
    """What :func:`build_report` wrote (paths relative to the report directory)."""

    directory: Path
    input: str
    model: str
    frames: int
    height: int
    width: int
    shown: list[int]
    results: list[TargetResult]
    skipped: list[dict[str, str]]
    originals: dict[int, str]
    plot: str
    colorbar: str
    heat_max: float
    plan: dict[str, Any]

    @property
    def html_path(self) -> Path:
        return self.directory / "index.html"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["directory"] = str(self.directory)
        return d


REPORT_PACKAGES = ("matplotlib", "skimage")  # plots, SSIM


def require_report_packages() -> None:
    """Fail before any work when the plotting/SSIM packages are missing, naming what to install."""
    from cvvae.extras import require

    for module in REPORT_PACKAGES:
        require(module, "cvvae report")


def shown_frame_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frames spread evenly over the clip, first and last included."""
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def heat_map(original: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """|original - recon| of one frame (3,H,W in [-1, 1]) averaged over RGB, in [0, 1] pixel units (H, W)."""
    return ((original.float() - recon.float()).abs().mean(0) / 2).cpu().numpy()


def nice_ceil(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= value (a round top for a colour scale)."""
    if value <= 0:
        return 1e-3
    exp = np.floor(np.log10(value))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= value * (1 - 1e-9):
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def auto_heat_max(x: torch.Tensor, recon: torch.Tensor, shown: list[int]) -> float:
    """99th percentile of |x - recon| (RGB mean, [0, 1] units) over the shown frames, rounded up; at most 1."""
    errors = np.concatenate([heat_map(x[0, :, t], recon[0, :, t]).ravel() for t in shown])
    return min(1.0, nice_ceil(float(np.quantile(errors, 0.99))))


def _load_vae(target: Target, model_spec: str | None, export_dir: Path | None, threads: int | None) -> Any:
    from cvvae.runtime.api import VideoVAE

    if target.backend == "torch":
        from cvvae.tools.parity import checkpoint_of

        return VideoVAE.load(checkpoint_of(model_spec), backend="torch", precision=target.precision)
    if target.backend == "onnxruntime":
        if export_dir is None:
            raise BackendUnavailableError("onnxruntime is not installed")
        from cvvae.export.manifest import load_manifest

        manifest = load_manifest(export_dir)
        missing = [c for c in ("encoder", "decoder") if target.precision not in manifest.precisions(c)]
        if missing:
            raise InputError(f"{export_dir} has no {target.precision} {' or '.join(missing)} graph "
                             f"(it has {', '.join(manifest.precisions('encoder'))})")
        return VideoVAE.load(export_dir, backend="onnxruntime", precision=target.precision, threads=threads)
    return VideoVAE.load(model_spec, backend=target.backend, precision=target.precision)


def build_report(input_path: str | Path, model_spec: str | None, out_dir: str | Path,
                 config: ReportConfig | None = None, *, overwrite: bool = False,
                 on_progress: Progress | None = None) -> Report:
    """Reconstruct ``input_path`` with every target of ``config`` and write the report into ``out_dir``."""
    from cvvae.fsutil import check_writable_target
    from cvvae.extras import is_installed
    from cvvae.tools.parity import load_input

    config = config or ReportConfig()
    say = on_progress or (lambda msg: log.info("%s", msg))
    out_dir = Path(out_dir)
    check_writable_target(out_dir, overwrite=overwrite, what="report directory", kind="report")
    require_report_packages()
    if threads := config.threads:
        torch.set_num_threads(threads)
    x = load_input(Path(input_path), config.read_kwargs)  # B,3,T,H,W in [-1, 1]
    if x.shape[2] == 0:
        raise InputError(f"{input_path}: no frames selected")
    if min(x.shape[3:]) < SSIM_WINDOW:
        raise InputError(f"frames of {x.shape[3]}x{x.shape[4]} are too small for SSIM ({SSIM_WINDOW}x{SSIM_WINDOW} "
                         "window); pick --size")
    targets = [Target.parse(t) for t in config.targets]
    export_dir = None
    ort_precisions = tuple(t.precision for t in targets if t.backend == "onnxruntime")
    if ort_precisions and is_installed("onnxruntime"):
        say("ONNX export (cached after the first run)")
        export_dir = onnx_export_for(model_spec)
    recons: list[tuple[Target, torch.Tensor, float, float]] = []
    skipped: list[dict[str, str]] = []
    plan: dict[str, Any] = {}
    for target in targets:
        try:
            vae = _load_vae(target, model_spec, export_dir, config.threads)
        except (BackendUnavailableError, InputError) as e:
            skipped.append({"target": target.label, "reason": str(e)})
            say(f"{target.label} skipped: {e}")
            continue
        say(f"{target.label}: encode and decode {x.shape[2]} frames of {x.shape[3]}x{x.shape[4]}")
        with torch.inference_mode():
            t0 = time.perf_counter()
            latents = vae.encode(x)
            t1 = time.perf_counter()
            recon = vae.decode(latents, check_model=False)
            t2 = time.perf_counter()
        plan = latents.metadata.get("plan", plan)
        recons.append((target, recon, t1 - t0, t2 - t1))
        del vae
    if not recons:
        raise BackendUnavailableError("no target could run: " + "; ".join(f"{s['target']}: {s['reason']}"
                                                                            for s in skipped))
    shown = shown_frame_indices(x.shape[2], config.shown_frames)
    heat_max = config.heat_max or auto_heat_max(x, recons[0][1], shown)
    with atomic_path(out_dir, overwrite=overwrite, directory=True, kind="report") as tmp:
        (tmp / "images").mkdir()
        originals = _save_originals(x, shown, tmp)
        results = [_evaluate(target, recon, x, recons[0][1], enc_s, dec_s, shown, tmp, heat_max, first=i == 0)
                   for i, (target, recon, enc_s, dec_s) in enumerate(recons)]
        plot = _save_metric_plot(results, tmp / "images" / "metrics.png")
        colorbar = _save_colorbar(heat_max, tmp / "images" / "colorbar.png")
        report = Report(out_dir, str(input_path), model_spec or "default", x.shape[2], x.shape[3], x.shape[4], shown,
                        results, skipped, originals, plot, colorbar, heat_max, plan)
        (tmp / "report.json").write_text(json.dumps(report.as_dict(), indent=1, default=_json_default) + "\n")
        (tmp / "index.html").write_text(render_html(report, config))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _imsave(path: Path, array: np.ndarray, **kwargs: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, array, **kwargs)


def _save_originals(x: torch.Tensor, shown: list[int], root: Path) -> dict[int, str]:
    frames = to_uint8_frames(x)[0]  # T,H,W,3
    paths = {}
    for t in shown:
        rel = f"images/frame{t:04d}-original.png"
        _imsave(root / rel, frames[t])
        paths[t] = rel
    return paths


def _evaluate(target: Target, recon: torch.Tensor, x: torch.Tensor, first_recon: torch.Tensor, encode_s: float,
              decode_s: float, shown: list[int], root: Path, heat_max: float, *, first: bool) -> TargetResult:
    diff = (recon.double() - x.double()).abs()
    ssim_mean, ssim_frames = ssim_video(x, recon)
    slug = target.label.replace(" ", "-")
    frames = to_uint8_frames(recon)[0]
    images = {}
    for t in shown:
        recon_rel, heat_rel = f"images/frame{t:04d}-{slug}.png", f"images/frame{t:04d}-{slug}-error.png"
        _imsave(root / recon_rel, frames[t])
        _imsave(root / heat_rel, heat_map(x[0, :, t], recon[0, :, t]), cmap="inferno", vmin=0.0,
                vmax=heat_max)
        images[t] = {"recon": recon_rel, "heat": heat_rel}
    return TargetResult(
        target=target.label, psnr=psnr(x, recon), ssim=ssim_mean, max_abs=float(diff.max()) / 2,
        mean_abs=float(diff.mean()) / 2,
        psnr_vs_first=None if first else psnr(first_recon, recon),
        max_abs_vs_first=None if first else float((recon - first_recon).abs().max()) / 2,
        encode_s=encode_s, decode_s=decode_s, psnr_per_frame=psnr_per_frame(x, recon), ssim_per_frame=ssim_frames,
        images=images)


def _save_metric_plot(results: list[TargetResult], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(10, 3.4))
    for r in results:
        frames = range(len(r.psnr_per_frame))
        ax_p.plot(frames, r.psnr_per_frame, marker=".", label=r.target)
        ax_s.plot(frames, r.ssim_per_frame, marker=".", label=r.target)
    ax_p.set(xlabel="frame", ylabel="PSNR (dB)", title="PSNR per frame")
    ax_s.set(xlabel="frame", ylabel="SSIM", title="SSIM per frame")
    for ax in (ax_p, ax_s):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"images/{path.name}"


def _save_colorbar(heat_max: float, path: Path) -> str:
    ramp = np.tile(np.linspace(0.0, heat_max, 256), (12, 1))
    _imsave(path, ramp, cmap="inferno", vmin=0.0, vmax=heat_max)
    return f"images/{path.name}"


# ----- HTML ----------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.92em; margin-bottom: 8px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.frames { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ccc; display: block; }
figcaption { font-size: 0.85em; color: #444; margin: 3px 0 5px; line-height: 1.3; white-space: nowrap;
             overflow: hidden; text-overflow: ellipsis; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 0.85em; color: #444; }
.legend img { width: 256px; height: 12px; border: 1px solid #ccc; }
.skipped { color: #8a5a00; }
img.plot { max-width: 100%; height: auto; }
"""


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if not np.isfinite(value):
        return "∞" if value > 0 else "-∞"
    return format(value, spec)


def render_html(report: Report, config: ReportConfig) -> str:
    """The page: header, numbers, per-frame plot, then per shown frame the original and each target side by side."""
    e = html.escape
    title = config.title or f"CV-VAE reconstruction report: {Path(report.input).name}"
    first = report.results[0].target
    rows = []
    for r in report.results:
        rows.append(
            f"<tr><td>{e(r.target)}</td><td class=num>{_num(r.psnr, '.2f')}</td><td class=num>{_num(r.ssim, '.4f')}"
            f"</td><td class=num>{_num(r.mean_abs, '.4f')}</td><td class=num>{_num(r.max_abs, '.3f')}</td>"
            f"<td class=num>{_num(r.psnr_vs_first, '.1f')}</td><td class=num>{_num(r.max_abs_vs_first, '.2e')}</td>"
            f"<td class=num>{_num(r.encode_s, '.2f')}</td><td class=num>{_num(r.decode_s, '.2f')}</td></tr>")
    skipped = "".join(f"<li>{e(s['target'])}: {e(s['reason'])}</li>" for s in report.skipped)
    sections = []
    for t in report.shown:
        cards = [f"<figure><figcaption><b>original</b><br>frame {t}</figcaption>"
                 f"<img src=\"{e(report.originals[t])}\" alt=\"original frame {t}\"></figure>"]
        for r in report.results:
            img = r.images[t]
            cards.append(
                f"<figure><figcaption><b>{e(r.target)}</b><br>PSNR {_num(r.psnr_per_frame[t], '.2f')} dB · "
                f"SSIM {_num(r.ssim_per_frame[t], '.3f')}</figcaption>"
                f"<img src=\"{e(img['recon'])}\" alt=\"{e(r.target)} frame {t}\">"
                f"<figcaption>|original − {e(r.target)}|</figcaption>"
                f"<img src=\"{e(img['heat'])}\" alt=\"{e(r.target)} error frame {t}\"></figure>")
        sections.append(f"<h3>Frame {t}</h3>\n<div class=frames>\n" + "\n".join(cards) + "\n</div>")
    plan = report.plan
    plan_text = ""
    if plan:  # counts, not the list lengths: describe() summarizes long lists
        tiles = plan.get("tile_row_count", len(plan.get("tile_rows_px", []))) * plan.get(
            "tile_col_count", len(plan.get("tile_cols_px", [])))
        chunks = plan.get("encode_chunk_count", len(plan.get("encode_chunks_frames", [])))
        plan_text = (f"plan: padded {plan.get('padded')}, latent {plan.get('latent')}, {chunks} encode chunk(s), "
                     f"{tiles} tile(s)")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{e(title)}</h1>
<p class="meta">input <code>{e(report.input)}</code> · {report.frames} frames of {report.height}×{report.width} ·
model <code>{e(report.model)}</code> · {e(plan_text)}</p>
{'<p class="skipped">Random weights: the reconstructions are noise; the page shows how the backends compare.</p>'
 if report.model.startswith("random:") else ''}

<h2>Numbers</h2>
<table>
<thead><tr><th>target</th><th>PSNR dB</th><th>SSIM</th><th>mean |err|</th><th>max |err|</th>
<th>PSNR vs {e(first)} dB</th><th>max |diff| vs {e(first)}</th><th>encode s</th><th>decode s</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<p class="meta">Against the original clip; errors in pixel units ([0, 1]); PSNR and SSIM as in
<code>cvvae.metrics</code> (SSIM: Gaussian 11x11 window on [0, 1] floats); timings are one run each, not a benchmark
(see <code>cvvae bench</code>).</p>
{f'<ul class="skipped">{skipped}</ul>' if skipped else ''}

<h2>Per-frame quality</h2>
<img class="plot" src="{e(report.plot)}" alt="PSNR and SSIM per frame">

<h2>Frames</h2>
<div class="legend">|original − reconstruction| averaged over RGB: 0
<img src="{e(report.colorbar)}" alt="colour scale"> {report.heat_max:g} (and above)</div>
{chr(10).join(sections)}
</body>
</html>
"""

"""``cvvae bench`` (speed and memory of the reference and every backend) and ``cvvae report`` (an HTML page of
reconstructions, error heat maps and quality numbers per backend). Thin commands over :mod:`cvvae.runtime.bench`
and :mod:`cvvae.runtime.report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cvvae.cli import DeviceParam, handle_errors
from cvvae.errors import InputError
from cvvae.fsutil import check_writable_target
from cvvae.extras import require
from cvvae.tools.bench import DEFAULT_TARGETS, OPS, BenchConfig, parse_hw, run_bench, write_results
from cvvae.runtime.cli import read_kwargs, video_read_options
from cvvae.tools.report import DEFAULT_REPORT_TARGETS, ReportConfig, build_report


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str | None, option: str) -> tuple[int, ...] | None:
    try:
        return None if value is None else tuple(int(v) for v in _csv(value) or ())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 17,65,257, got {value!r}",
                                 param_hint=option) from None


def _echo_progress(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option("--model", "models", multiple=True, metavar="PATH",
              help="Checkpoint, export or engine dir, random:PRESET or 'default' (repeatable). "
                   "Default: random:cvvae-v1 and the built-in default model (the full sweeps take hours on a CPU); "
                   "--quick: the default model, else random:tiny-v1.")
@click.option("--quick", is_flag=True, help="Small sweep: 17/65 frames at 16x16, sizes 16x16 and 32x32, 2 reps, "
                                           "1 thread (a smoke test; options given override it).")
@click.option("--targets", default=None, show_default=",".join(DEFAULT_TARGETS),
              help="Comma list of reference, torch[:fp32|bf16|fp16], onnxruntime[:fp32|fp16|int8], tensorrt[:...]. "
                   "The reference is always measured.")
@click.option("--ops", default=None, help=f"Comma list of {', '.join(OPS)} (default: all).")
@click.option("--frames", default=None, help="Frame-count sweep, e.g. 17,65,257 (default 17,65,257).")
@click.option("--frame-size", default=None, metavar="HxW", help="Size of the frame sweep (default 64x64).")
@click.option("--sizes", default=None, help="Size sweep, e.g. 64x64,128x128,256x256.")
@click.option("--size-frames", type=int, default=None, help="Frame count of the size sweep (default 17).")
@click.option("--reps", type=int, default=None, help="Timed repetitions per measurement (median; default 3).")
@click.option("--warmup", type=int, default=None, help="Warm-up runs on the first chunk (default 1).")
@click.option("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: usable cores).")
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--gemm-seconds", type=float, default=None, help="Length of each GEMM-peak measurement (default 2).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write bench.json, bench.md and PNG plots into this directory.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots (no matplotlib needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the table.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out directory.")
@handle_errors
def bench(models, quick, targets, ops, frames, frame_size, sizes, size_frames, reps, warmup, threads, device,
          gemm_seconds, out_dir, no_plots, as_json, force) -> None:
    """Time the PyTorch reference and every backend/precision on the same inputs: ms/frame, fps, GFLOP/s against
    the machine's GEMM peak, peak memory, and the ratio to the reference."""
    if out_dir is not None:
        check_writable_target(out_dir, overwrite=force, what="bench output directory", kind="bench")
        if not no_plots:
            require("matplotlib", "the bench plots", instead="pass --no-plots")
    overrides = {
        "models": tuple(models) or None, "targets": _csv(targets), "ops": _csv(ops),
        "frames": _ints(frames, "--frames"),
        "frame_size": parse_hw(frame_size) if frame_size else None,
        "sizes": tuple(parse_hw(s) for s in _csv(sizes)) if sizes else None,
        "size_frames": size_frames, "reps": reps, "warmup": warmup, "threads": threads, "device": device,
        "gemm_seconds": gemm_seconds,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = BenchConfig.quick(**overrides) if quick else BenchConfig(**overrides)
    result = run_bench(cfg, on_progress=_echo_progress)
    if out_dir is not None:
        write_results(result, out_dir, overwrite=force, plots=not no_plots)
        click.echo(f"wrote {out_dir}/bench.json, bench.md" + ("" if no_plots else " and plots"), err=True)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=1))
    else:
        click.echo(result.markdown())
    if not result.rows:
        raise click.ClickException("nothing was measured: " + "; ".join(s["reason"] for s in result.skipped))


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Checkpoint, export dir or random:PRESET. Default: the built-in default model.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Report directory (index.html, images/, report.json).")
@click.option("--targets", default=",".join(DEFAULT_REPORT_TARGETS), show_default=True,
              help="Comma list of torch[:fp32|bf16], onnxruntime[:fp32|fp16|int8]; unavailable ones are listed as "
                   "skipped.")
@video_read_options
@click.option("--shown-frames", type=int, default=4, show_default=True, help="Frames shown as images.")
@click.option("--heat-max", type=float, default=None,
              help="|error| (pixel units, [0,1]) at the top of the heat-map colour scale "
                   "(default: the 99th percentile of the first target's error, rounded up).")
@click.option("--threads", type=int, default=None, help="torch and ONNX Runtime threads.")
@click.option("--force", is_flag=True, help="Overwrite an existing report directory.")
@handle_errors
def report(input_path, model_path, out_dir, targets, start, end, stride, max_frames, size, resize_short_side,
           center_crop, shown_frames, heat_max, threads, force) -> None:
    """HTML page (offline) with original and reconstructed frames per backend, error heat maps, per-frame
    PSNR/SSIM and a table of the numbers. --max-frames defaults to 17."""
    if not input_path.exists():
        raise InputError(f"input {input_path} does not exist")
    rkw = read_kwargs(start, end, stride, max_frames or 17, size, resize_short_side, center_crop)
    cfg = ReportConfig(targets=_csv(targets) or (), read_kwargs=rkw, shown_frames=shown_frames, heat_max=heat_max,
                       threads=threads)
    result = build_report(input_path, model_path, out_dir, cfg, overwrite=force, on_progress=_echo_progress)
    for r in result.results:
        click.echo(f"{r.target:<18} PSNR {r.psnr:6.2f} dB  SSIM {r.ssim:.4f}  encode {r.encode_s:.2f} s  "
                   f"decode {r.decode_s:.2f} s")
    for s in result.skipped:
        click.echo(f"{s['target']:<18} skipped: {s['reason']}")
    click.echo(f"wrote {result.html_path}")

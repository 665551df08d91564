"""``cvvae calibrate`` (INT8 graphs for an export) and ``cvvae accuracy`` (per-precision report).

Thin click commands: they build :class:`~cvvae.calibration.quantize.CalibrationConfig` /
:class:`~cvvae.tools.accuracy.AccuracyConfig` and call ``calibrate_export`` / ``accuracy_report``.
Heavy imports (ONNX Runtime's quantization tools, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cvvae.cli import handle_errors, plan_options, plan_overrides


def _hw(value: str | None, option: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 128x224, got {value!r}", param_hint=option) from None
    return h, w


def _clips(data: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    clips = [*data, *extra]
    if not clips:
        raise click.UsageError("no clips: pass --data CLIP_OR_FOLDER [MORE ...]")
    return clips


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("calibrate")
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Source export directory (fp32 graphs + manifest.json).")
@click.option("--data", multiple=True, metavar="CLIP", help="Calibration video files or folders of videos "
              "(repeatable; further paths after the options are clips too).")
@click.argument("more_clips", nargs=-1, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="New export directory to write.")
@click.option("--num-chunks", type=int, default=8, show_default=True, help="Calibration chunks.")
@click.option("--holdout-chunks", type=int, default=2, show_default=True,
              help="Further chunks for the sensitivity search (not calibrated on).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="percentile",
              show_default=True, help="How activation ranges are computed (entropy: 2048-bin KL, as TensorRT).")
@click.option("--percentile", type=float, default=99.999, show_default=True)
@click.option("--chunk-frames", type=int, default=None,
              help="Frames per chunk minus one (default: the plan's chunk_frames); smaller is faster.")
@click.option("--tile-size", type=int, default=None,
              help="Crop size in px (default: the plan's tile size, at most 256).")
@click.option("--frame-stride", type=int, default=1, show_default=True, help="Take every N-th source frame.")
@click.option("--resize-short-side", type=int, default=None, help="Resize videos before cropping (px).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", "patterns", multiple=True, metavar="GLOB",
              help="Keep nodes float whose name or module path matches (e.g. 'decoder.up.0.*'); repeatable.")
@click.option("--exclude-op-type", "op_types", multiple=True, type=click.Choice(["Conv", "MatMul", "Gemm"]),
              help="Keep every node of this op type float; repeatable.")
@click.option("--quantize-first-last-conv", is_flag=True,
              help="Also quantize the first and last convolutions (kept float by default).")
@click.option("--quantize-attention", is_flag=True,
              help="Also quantize the MatMuls around Softmax (kept float by default).")
@click.option("--target-psnr-drop", type=float, default=0.5, show_default=True,
              help="Sensitivity search: largest allowed round-trip PSNR drop vs fp32 on the held-out chunks (dB).")
@click.option("--no-search", is_flag=True, help="Skip the sensitivity search (configured exclusions only).")
@click.option("--quantizer", type=click.Choice(["auto", "onnxruntime", "modelopt"]), default="auto",
              show_default=True, help="auto: nvidia-modelopt for the final graphs when installed, else onnxruntime.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--force", is_flag=True, help="Overwrite the output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration records as JSON.")
@handle_errors
def calibrate(export_dir, data, more_clips, out_dir, num_chunks, holdout_chunks, method, percentile, chunk_frames,
              tile_size, frame_stride, resize_short_side, seed, patterns, op_types, quantize_first_last_conv,
              quantize_attention, target_psnr_drop, no_search, quantizer, threads, force, as_json) -> None:
    """INT8 (Q/DQ) graphs for an export, calibrated on real video chunks; writes a new export directory."""
    from cvvae.calibration.quantize import CalibrationConfig, Exclusions, QuantizeConfig, calibrate_export

    clips = _clips(data, more_clips)
    config = CalibrationConfig(
        quantize=QuantizeConfig(method=method, percentile=percentile, quantizer=quantizer,
                                exclusions=Exclusions(patterns=tuple(patterns), op_types=tuple(op_types),
                                                      first_last_conv=not quantize_first_last_conv,
                                                      attention_matmuls=not quantize_attention)),
        num_chunks=num_chunks, holdout_chunks=holdout_chunks, chunk_frames=chunk_frames, tile_size=tile_size,
        frame_stride=frame_stride, resize_short_side=resize_short_side, seed=seed,
        target_psnr_drop=None if no_search else target_psnr_drop, threads=threads)
    manifest = calibrate_export(export_dir, clips, out_dir, config, overwrite=force,
                                on_progress=None if as_json else _say)
    records = {c: manifest.graph_file(c, "int8").calibration for c in manifest.components
               if "int8" in manifest.precisions(c)}
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
        return
    for component, rec in records.items():
        sens = rec.get("sensitivity") or {}
        final = sens.get("final") or {}
        click.echo(f"{component}: {rec['qdq']['quantized_nodes']} INT8 nodes, {len(rec['qdq']['float_nodes'])} float "
                   f"({len(rec['exclusions']['nodes'])} configured, {len(rec['exclusions']['sensitivity_nodes'])} "
                   "by sensitivity)")
    if final:
        click.echo(f"held-out round trip: drop {final['drop_db']:.3f} dB vs fp32 (target {sens['target_drop_db']}), "
                   f"{final['psnr_vs_fp32']} dB vs fp32")
    click.echo(f"wrote {out_dir}: load it with VideoVAE.load(dir, backend='onnxruntime', precision='int8')")


@click.command("accuracy")
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Export directory (fp32 and any fp16/int8 graphs).")
@click.option("--data", multiple=True, metavar="CLIP", help="Evaluation video files or folders (repeatable; "
              "further paths after the options are clips too).")
@click.argument("more_clips", nargs=-1, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Report directory to write.")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True,
              help="Comma-separated; fp32 is the reference; precisions missing from the export are skipped.")
@click.option("--max-frames", type=int, default=17, show_default=True)
@click.option("--start", type=int, default=0, help="First source frame.")
@click.option("--stride", type=int, default=1, help="Take every N-th frame.")
@click.option("--size", default=None, metavar="HxW", help="Resize to exactly HxW.")
@click.option("--resize-short-side", type=int, default=128, show_default=True, help="Resize keeping aspect ratio.")
@click.option("--center-crop", default=None, metavar="HxW", help="Centre crop after resizing.")
@plan_options
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--force", is_flag=True, help="Overwrite the report directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def accuracy(export_dir, data, more_clips, out_dir, precisions, max_frames, start, stride, size, resize_short_side,
             center_crop, threads, force, as_json, **plan_kw: Any) -> None:
    """PSNR/SSIM/max-abs of every precision vs fp32 and vs the input, through the runtime; Markdown+JSON+PNG."""
    from cvvae.tools.accuracy import AccuracyConfig, accuracy_report

    clips = _clips(data, more_clips)
    hw = _hw(size, "--size")
    config = AccuracyConfig(precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                            max_frames=max_frames, start=start, stride=stride, size=hw,
                            resize_short_side=None if hw else resize_short_side,
                            center_crop=_hw(center_crop, "--center-crop"), plan_overrides=plan_overrides(**plan_kw),
                            threads=threads)
    report = accuracy_report(export_dir, clips, out_dir, config, overwrite=force,
                             on_progress=None if as_json else _say)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
        return
    click.echo(Path(out_dir, "report.md").read_text().split("## Latents")[0].rstrip())
    click.echo(f"\nwrote {out_dir} (report.md, report.json, per_frame_psnr.png, side_by_side.png)")

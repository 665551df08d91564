"""``cvvae export`` and ``cvvae inspect``: thin click commands over :mod:`cvvae.export`.

Arguments are checked (opset, components, precisions, output directory) before the model is loaded, so a bad
invocation fails at once and writes nothing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from cvvae.export import contract


def _handle_errors(fn: Callable) -> Callable:
    """The root CLI's error policy (one-line message, non-zero exit), looked up at call time.

    Imported lazily because ``cvvae.cli`` imports this module while registering its commands.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cvvae.cli import handle_errors

        return handle_errors(fn)(*args, **kwargs)

    return wrapper


def _echo_progress(message: str) -> None:
    click.echo(f"[export] {message}", err=True)


@click.command("export")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Checkpoint folder or file, or random:PRESET (random:cvvae-v1, random:tiny-sd3, ...). "
                   "Default: the built-in default model.")
@click.option("--preset", default=None, help="Architecture preset for a bare weights file "
                                            "(cvvae-v1, cvvae-sd3, tiny-v1, tiny-sd3).")
@click.option("--subfolder", default=None, help="vae3d* subfolder of a multi-model folder.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled extras in a trusted .ckpt/.pt.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Export directory to create (graphs + manifest.json).")
@click.option("--components", default=",".join(contract.COMPONENTS), show_default=True,
              help="Comma-separated components to export.")
@click.option("--precisions", default="fp32,fp16", show_default=True,
              help="Comma-separated graph precisions (fp32 is always written: the other precisions derive from it).")
@click.option("--opset", type=int, default=contract.DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset ({contract.OPSET_MIN}-{contract.OPSET_MAX}).")
@click.option("--exporter", type=click.Choice(contract.EXPORTERS), default=contract.DEFAULT_EXPORTER,
              show_default=True, help="torch.onnx exporter: TorchScript tracer or torch.export (dynamo).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare every graph with PyTorch in ONNX Runtime (tiny shapes) and fail above tolerance.")
@click.option("--fp16-io/--fp32-io", default=True, show_default=True,
              help="I/O dtype of the fp16 graphs (the manifest records it).")
@click.option("--fp16-max-abs", type=float, default=None,
              help="fp16 rule: keep nodes fp32 whose measured |values| reach this (default 4096).")
@click.option("--external-data-threshold", type=int, default=contract.DEFAULT_EXTERNAL_DATA_THRESHOLD,
              show_default=True, help="Weights above this many bytes go to <graph>.onnx.data.")
@click.option("--force", is_flag=True, help="Replace an existing export directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_handle_errors
def export_command(model_path: str | None, preset: str | None, subfolder: str | None, trust_checkpoint: bool,
                   out_dir: Path, components: str, precisions: str, opset: int, exporter: str, verify: bool,
                   fp16_io: bool, fp16_max_abs: float | None, external_data_threshold: int, force: bool,
                   as_json: bool) -> None:
    """Export the encoder and decoder to ONNX (one graph per component and precision) with manifest.json."""
    import dataclasses

    from cvvae.export.precision import Fp16Rule, parse_precisions
    from cvvae.export.to_onnx import ExportConfig, export_model, parse_components
    from cvvae.export.verify import format_table
    from cvvae.fsutil import check_writable_target
    from cvvae.loading import load_model

    rule = Fp16Rule(low_io=fp16_io)
    if fp16_max_abs is not None:
        rule = dataclasses.replace(rule, max_abs=fp16_max_abs)
    config = ExportConfig(components=parse_components(components), precisions=parse_precisions(precisions),
                          opset=opset, exporter=exporter, verify=verify,
                          external_data_threshold=external_data_threshold, fp16_rule=rule)
    check_writable_target(out_dir, overwrite=force, what="export directory", kind="export")
    model = load_model(model_path, preset=preset, subfolder=subfolder, trust_pickle=trust_checkpoint)
    manifest = export_model(model, out_dir, config, overwrite=force, on_progress=_echo_progress)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    from cvvae.compare import Comparison

    comparisons = []
    for name, entry in manifest.components.items():
        for precision, f in entry.files.items():
            status = f.verified.get("status", "skipped")
            click.echo(f"{name:<8} {precision:<5} {f.path:<22} {f.size_bytes / 1e6:8.1f} MB  "
                       f"io {'/'.join(sorted(set(f.io_dtypes.values())))}  verification {status}")
            comparisons += [Comparison.from_dict(c) for c in f.verified.get("comparisons", [])]
    if comparisons:
        click.echo(format_table(comparisons))
    click.echo(f"manifest: {out_dir / contract.MANIFEST_NAME}")


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_handle_errors
def inspect_command(path: Path, as_json: bool) -> None:
    """Inputs and outputs (with dynamic dims), opset, precision and op counts of an ONNX file or export directory."""
    from cvvae.export.inspect_onnx import format_summary, inspect_graph
    from cvvae.export.manifest import load_manifest

    if path.is_dir():
        m = load_manifest(path)
        paths = [m.graph_path(c, p) for c in m.components for p in m.precisions(c)]
    else:
        paths = [path]
    summaries = [inspect_graph(p) for p in paths]
    if as_json:
        data = [s.as_dict() for s in summaries]
        click.echo(json.dumps(data[0] if not path.is_dir() else data, indent=2))
        return
    click.echo("\n\n".join(format_summary(s) for s in summaries))


# names under which cvvae.cli registers the commands
export = export_command
inspect = inspect_command

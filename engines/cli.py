"""``cvvae build-engines``: TensorRT engines from an export directory, or the equivalent ``trtexec`` lines.

A thin click command over :mod:`cvvae.engines.build`; options become a :class:`ProfileSpec` and :class:`BuildOptions`,
checked (with the memory estimate printed) before TensorRT is touched. ``--print-trtexec`` needs no TensorRT.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click


def _handle_errors(fn: Callable) -> Callable:
    """The root CLI's error policy, looked up at call time (``cvvae.cli`` imports this module while registering)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cvvae.cli import handle_errors

        return handle_errors(fn)(*args, **kwargs)

    return wrapper


def _range(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise click.BadParameter(f"expected MIN,OPT,MAX (or one number), got {text!r}", param_hint="--batch")
    return values  # type: ignore[return-value]


@click.command("build-engines")
@click.option("--export", "export_dir", required=True, type=click.Path(path_type=Path),
              help="Export directory (python export/to_onnx.py / cvvae export).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Engine directory.")
@click.option("--precision", default="fp16", show_default=True,
              help="Which graph variant of the export to build (fp32, fp16, int8 where exported).")
@click.option("--components", default=None, help="Comma list (default: every component of the export).")
@click.option("--profiles", "profiles_file", type=click.Path(path_type=Path), default=None,
              help="Profile spec TOML (example: configs/profiles/default.toml). Default: derived from the plan.")
@click.option("--batch", default=None, metavar="MIN,OPT,MAX",
              help="Batch range of the default profiles (default 1,1,1; --batch-tiles needs more).")
@click.option("--image-profile", is_flag=True, help="Add a single-frame profile to the default profiles.")
@click.option("--workspace-mb", type=int, default=None, help="Workspace pool limit in MiB (default: TensorRT's).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Let fp32 layers use TF32 (faster on Ampere+, ~1e-3 relative error).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file (default: OUT/timing.timing_cache).")
@click.option("--print-trtexec", is_flag=True,
              help="Write the sidecars of trtexec builds and print their commands; no TensorRT needed "
                   "(the tensorrt backend checks such engines at their first load).")
@click.option("--rebuild", is_flag=True, help="Rebuild engines that exist, including stale or foreign ones (with "
              "--print-trtexec: give them the printed commands' sidecars).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_handle_errors
def build_engines(export_dir: Path, out_dir: Path, precision: str, components: str | None, profiles_file: Path | None,
                  batch: str | None, image_profile: bool, workspace_mb: int | None, opt_level: int, tf32: bool,
                  timing_cache: Path | None, print_trtexec: bool, rebuild: bool, as_json: bool) -> None:
    """Build strongly typed TensorRT engines (one per component) with JSON sidecars into an engine directory."""
    from cvvae.engines import build
    from cvvae.engines.profile import ProfileSpec, default_spec
    from cvvae.export.manifest import load_manifest
    from cvvae.runtime.backends import is_installed

    manifest = load_manifest(export_dir)
    wanted = [c.strip() for c in components.split(",") if c.strip()] if components else None
    if profiles_file is not None:
        if batch is not None or image_profile:
            raise click.UsageError("--batch and --image-profile shape the default profiles; with --profiles FILE "
                                   "put them in the file")
        spec = ProfileSpec.from_toml(profiles_file)
    else:
        spec = default_spec(manifest, batch=_range(batch) or (1, 1, 1), image_profile=image_profile,
                            components=wanted)
    options = build.BuildOptions(workspace_mb=workspace_mb, opt_level=opt_level, timing_cache=timing_cache,
                                 tf32=tf32)
    builders = build.plan_engines(export_dir, out_dir, precision, spec=spec, options=options, components=wanted)
    for b in builders:
        click.echo(f"[engines] {b.engine_path.name}: {len(b.profiles)} profile(s) "
                   + "; ".join(repr(p) for p in b.profiles), err=True)
        if b.memory:
            click.echo(f"[engines] {b.engine_path.name}: memory estimate {b.memory.describe()}", err=True)
    if print_trtexec:
        from cvvae.engines.trtexec import write_trtexec_sidecars

        written = write_trtexec_sidecars(builders, export_dir, out_dir, rebuild=rebuild)
        for t in written:
            click.echo(f"[engines] {t.builder.sidecar_path}: "
                       + ("sidecar written" if t.status == "written" else "sidecar current, kept"), err=True)
        if as_json:
            click.echo(json.dumps([{"engine": str(t.builder.engine_path), "sidecar": str(t.builder.sidecar_path),
                                    "status": t.status, "command": t.command} for t in written], indent=2))
            return
        click.echo(f"# Equivalent trtexec builds; their sidecars are in {out_dir}. Run these lines on the GPU machine "
                   f"from {Path.cwd()}.\n# The tensorrt backend checks each engine's I/O tensors and profiles against "
                   "its sidecar at its first load,\n# then records its sha256 and refuses any other plan file.")
        for t in written:
            click.echo(t.builder.trtexec_line())
        return
    if not is_installed("tensorrt"):
        from cvvae.errors import BackendUnavailableError
        from cvvae.runtime.backends import INSTALL_HINTS

        raise BackendUnavailableError(f"TensorRT is not installed here ({INSTALL_HINTS['tensorrt']}); "
                                      "--print-trtexec prints the equivalent trtexec commands instead")
    results = build.build_engines(export_dir, out_dir, precision, spec=spec, options=options, components=wanted,
                                  rebuild=rebuild, on_progress=lambda m: click.echo(f"[engines] {m}", err=True))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for r in results:
        click.echo(f"{r.component:<8} {r.precision:<5} {r.status:<8} {r.engine}"
                   + (f"  ({r.seconds:.1f} s)" if r.status == "built" else ""))
    click.echo(f"engine directory: {out_dir} (load with --backend tensorrt --model {out_dir})")

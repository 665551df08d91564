"""Export CV-VAE's encoder and decoder to ONNX: one graph per component and precision, plus manifest.json.

Usage (also ``cvvae export``)::

    python export/to_onnx.py --model CKPT --out DIR [--components encoder,decoder] [--precisions fp32,fp16]
                             [--opset 19] [--exporter torchscript|dynamo] [--no-verify] [--force]

Steps per component: wrap the module (tensor in, tensors out) -> export with dynamic batch/frames/height/width ->
clean the graph (constants folded, dead nodes removed, shapes inferred, I/O axes named) -> fp32 file -> lower
precisions (:mod:`cvvae.export.precision`) -> static TensorRT check and ONNX Runtime vs PyTorch verification
(:mod:`cvvae.export.verify`). Everything is written into a temporary directory next to ``out`` and renamed when
complete, so a failed export leaves nothing behind.

Exporters: ``torchscript`` (default; what NVIDIA's diffusion demo uses; GroupNorm lowers to InstanceNormalization) and
``dynamo`` (torch.export; also lowers GroupNorm to InstanceNormalization at opsets 18-20 in torch 2.13; several
times slower to export; opset 18+ only). The model is written for both: it reshapes with sizes read from its input
(the TorchScript tracer freezes sizes read from ``unflatten`` results) and calls attention with 4D tensors (the only
rank torch's ONNX library translates).

Graph hygiene is onnxslim's (:func:`simplify`; built on onnx-graphsurgeon): constant folding, dead-node removal,
common-subexpression elimination, identical-initializer merging and a few no-op eliminations, to a fixed point. It
replaced ~200 lines of our own passes after a measurement (docs/export.md, "Graph hygiene"): on the default model it
leaves the same or fewer nodes of every op type (encoder 339 = ours, decoder 528 vs 534), and 461 vs 505 encoder
nodes on ``random:cvvae-v1``, with the same outputs. onnx-graphsurgeon's ``fold_constants()`` + ``cleanup()`` alone
was not enough: no common-subexpression elimination (52 Shape nodes left in the encoder where 37 suffice) and no
initializer merging (302 initializers vs 89). None of the hand-written passes is kept.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a plain script: use the installed package

    def main() -> None:
        """``python export/to_onnx.py``: the ``cvvae export`` command, a program on top of the layers; its CLI import
        sits in a script's main() under the ``__main__`` block, which both layer checks (tests/test_layers.py,
        ../shared/tools/layers_check.py) leave to programs (docs/architecture.md)."""
        from pathlib import Path as _Path

        here = _Path(__file__).resolve().parent  # this folder on sys.path would shadow the package's modules
        sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != here]
        from cvvae.export.cli import export_command

        export_command.main(prog_name="to_onnx.py")  # exits with the command's status

    main()

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx
import torch
from torch import nn

from cvvae.errors import ExportError
from cvvae.export import contract
from cvvae.export.contract import COMPONENT_SPECS, ComponentSpec
from cvvae.export.precision import Fp16Rule, Precision, convert_precision, parse_precisions, select_fp32_nodes
from cvvae.extras import lazy_import
from cvvae.fsutil import atomic_path, check_writable_target
from cvvae.model import CVVAE

if TYPE_CHECKING:
    from cvvae.export.manifest import ExportManifest

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


# ----- configuration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. Checked on creation, before any model is loaded."""

    components: tuple[str, ...] = contract.COMPONENTS
    precisions: tuple[Precision, ...] = (Precision.FP32, Precision.FP16)
    opset: int = contract.DEFAULT_OPSET
    exporter: str = contract.DEFAULT_EXPORTER
    verify: bool = True
    # Graphs whose weights exceed this many bytes keep them in ``<file>.data`` (protobuf's limit is 2 GiB).
    external_data_threshold: int = contract.DEFAULT_EXTERNAL_DATA_THRESHOLD
    fp16_rule: Fp16Rule = field(default_factory=Fp16Rule)

    def __post_init__(self) -> None:
        if not self.components:
            raise ExportError("no components to export; choose from " + ", ".join(contract.COMPONENTS))
        unknown = [c for c in self.components if c not in COMPONENT_SPECS]
        if unknown:
            raise ExportError(f"unknown component(s) {', '.join(unknown)}; choose from "
                              + ", ".join(contract.COMPONENTS))
        if len(set(self.components)) != len(self.components):
            raise ExportError(f"component listed twice: {', '.join(self.components)}")
        check_opset(self.opset)
        if self.exporter not in contract.EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r}; choose from {', '.join(contract.EXPORTERS)}")
        if self.exporter == "dynamo" and self.opset < 18:
            raise ExportError(f"the dynamo exporter emits opset 18 or newer and cannot convert Pad down to "
                              f"{self.opset}; use --opset 18-20 or --exporter torchscript")
        precisions = tuple(Precision(p) for p in self.precisions)
        if Precision.FP32 not in precisions:  # the fp32 graph is the base of every other precision
            precisions = (Precision.FP32, *precisions)
        object.__setattr__(self, "precisions", tuple(dict.fromkeys(precisions)))
        if self.external_data_threshold < 1:
            raise ExportError(f"external_data_threshold={self.external_data_threshold} must be positive (bytes)")


def check_opset(opset: int) -> None:
    if not contract.OPSET_MIN <= opset <= contract.OPSET_MAX:
        raise ExportError(
            f"opset {opset} is not supported: use {contract.OPSET_MIN}-{contract.OPSET_MAX} "
            f"(default {contract.DEFAULT_OPSET}). Below 17 LayerNormalization is decomposed and Pad/Resize are older; "
            "21+ allows GroupNormalization-21, which TensorRT 10.7 and ONNX Runtime's CUDA provider reject"
        )


def parse_components(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


# ----- component wrappers ---------------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """``video`` -> (``mean``, ``logvar``): the raw encoder moments split on channels (no clamp, no sampling)."""

    def __init__(self, model: CVVAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = torch.chunk(self.encoder(video), 2, 1)
        return mean, logvar


class DecoderGraph(nn.Module):
    """``latent`` -> ``video``: the raw decoder."""

    def __init__(self, model: CVVAE) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


def component_module(model: CVVAE, component: str) -> nn.Module:
    return (EncoderGraph(model) if component == contract.ENCODER else DecoderGraph(model)).eval()


def sample_input(model: CVVAE, component: str, *, seed: int = 0) -> torch.Tensor:
    """The example input traced for export: several frames and a non-square size, so no axis gets fixed to 1.

    Encoder: 9 frames of 16x24 px (latent 3 x 2x3); decoder: 3 latent frames of 3x2 cells. Neither equals a
    verification shape (:data:`cvvae.export.verify.DEFAULT_CASES`), so verification shows the axes are dynamic.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if component == contract.ENCODER:
        shape = (1, cfg.in_channels, 9, 2 * cfg.spatial_compress, 3 * cfg.spatial_compress)
        return torch.rand(shape, generator=g) * 2 - 1
    return torch.randn((1, cfg.latent_channels, 3, 3, 2), generator=g)


# ----- exporter adaptations -------------------------------------------------------------------------------------
def _export_torchscript(module: nn.Module, spec: ComponentSpec, sample: torch.Tensor, opset: int,
                        scratch: Path) -> onnx.ModelProto:
    path = scratch / f"{spec.name}.raw.onnx"
    with warnings.catch_warnings():
        # the deprecation notice of the TorchScript exporter and tracer notes on shape arithmetic (checked by
        # verification at other shapes, which is what matters)
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    return onnx.load(str(path))


def _export_dynamo(module: nn.Module, spec: ComponentSpec, sample: torch.Tensor, opset: int,
                   scratch: Path) -> onnx.ModelProto:
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("the dynamo exporter needs the onnxscript package (pip install 'onnxscript>=0.5'); "
                          "or use --exporter torchscript")
    dim = torch.export.Dim.DYNAMIC
    dynamic = ({i: dim for i in spec.inputs[0].dynamic_axes()},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (sample,), dynamo=True, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=dynamic, verbose=False,
        )
    path = scratch / f"{spec.name}.raw.onnx"
    program.save(str(path), external_data=True)
    return onnx.load(str(path))


def export_raw(module: nn.Module, spec: ComponentSpec, sample: torch.Tensor, *, opset: int, exporter: str,
               scratch: Path) -> onnx.ModelProto:
    """The exporter's graph as it comes out (loaded into memory, external data included)."""
    scratch.mkdir(parents=True, exist_ok=True)
    fn = _export_torchscript if exporter == "torchscript" else _export_dynamo
    try:
        with torch.no_grad():
            return fn(module, spec, sample, opset, scratch)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"the {exporter} exporter failed on the {spec.name} at opset {opset}: "
                          f"{type(e).__name__}: {str(e)[:2000]}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----- graph hygiene --------------------------------------------------------------------------------------------
def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's passes: constants folded, dead nodes and unused initializers removed, common subexpressions and
    identical initializers merged, repeated until nothing changes. Graph I/O names, types and dims are kept."""
    onnxslim = lazy_import("onnxslim", "ONNX export (graph simplification)")
    slimmed = onnxslim.slim(model)
    if slimmed is None:  # only with model_check, which is off; keep the failure explicit all the same
        raise ExportError("onnxslim could not simplify the graph")
    return slimmed


def name_io_axes(model: onnx.ModelProto, spec: ComponentSpec, channels: dict[str, int]) -> None:
    """Give the graph inputs/outputs the contract's axis names (and the static channel count)."""
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name not in tensors:
            raise ExportError(f"graph tensor {vi.name!r} is not part of the {spec.name} contract "
                              f"({', '.join(tensors)})")
        t = tensors[vi.name]
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for axis in t.axes:
            d = shape.dim.add()
            if axis is None:
                d.dim_value = channels[t.kind]
            else:
                d.dim_param = axis


def clean_graph(model: onnx.ModelProto, spec: ComponentSpec, channels: dict[str, int]) -> onnx.ModelProto:
    """Name I/O axes, simplify with onnxslim (:func:`simplify`), name every node, infer and check shapes."""
    for node in model.graph.node:  # stable readable names where an exporter left none
        if not node.name:
            node.name = f"{node.op_type}_{node.output[0]}"
    del model.graph.value_info[:]
    name_io_axes(model, spec, channels)
    before = len(model.graph.node)
    model = simplify(model)
    name_io_axes(model, spec, channels)  # the contract's names, whatever the simplifier inferred
    for k, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{k}"
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    log.info("%s: %d nodes -> %d after simplification", spec.name, before, len(inferred.graph.node))
    return inferred


def graph_weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) for i in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path, *, external_data_threshold: int) -> bool:
    """Write ``path``; weights go to ``path.data`` when they exceed the threshold. Returns whether they did."""
    external = graph_weight_bytes(model) > external_data_threshold
    if external:
        data_name = path.name + contract.EXTERNAL_DATA_SUFFIX
        (path.parent / data_name).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        # save_model moved the bytes out of the in-memory proto; load them back for the steps that follow
        onnx.load_external_data_for_model(model, str(path.parent))
    else:
        onnx.save_model(model, str(path))
    return external


def set_metadata(model: onnx.ModelProto, **values: Any) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"cvvae.{k}": str(v) for k, v in values.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


# ----- the export ----------------------------------------------------------------------------------------------
def export_component_fp32(model: CVVAE, component: str, config: ExportConfig, scratch: Path) -> onnx.ModelProto:
    """The cleaned fp32 graph of one component."""
    spec = COMPONENT_SPECS[component]
    module = component_module(model, component)
    raw = export_raw(module, spec, sample_input(model, component), opset=config.opset,
                     exporter=config.exporter, scratch=scratch)
    channels = {"pixels": model.config.in_channels, "latent": model.config.latent_channels}
    if component == contract.DECODER:
        channels["pixels"] = model.config.out_channels
    proto = clean_graph(raw, spec, channels)
    got = {o.domain or "": o.version for o in proto.opset_import}.get("", None)
    if got != config.opset:
        raise ExportError(f"the {config.exporter} exporter produced opset {got} for the {component}, "
                          f"not the requested {config.opset}")
    set_metadata(proto, format=contract.FORMAT, component=component, precision="fp32", variant=model.config.variant)
    return proto


def export_model(model: CVVAE, out_dir: str | Path, config: ExportConfig | None = None, *,
                 overwrite: bool = False, on_progress: Progress | None = None) -> "ExportManifest":
    """Export ``model`` into ``out_dir`` (graphs + manifest.json) and return the loaded manifest.

    Raises :class:`cvvae.errors.ExportError` (and leaves nothing behind) when a graph fails the TensorRT checks or
    verification exceeds a tolerance; the message carries the error table.
    """
    from cvvae.export import manifest as manifest_mod
    from cvvae.export import verify as verify_mod

    config = config or ExportConfig()
    out_dir = Path(out_dir)
    check_writable_target(out_dir, overwrite=overwrite, what="export directory", kind="export")
    say = on_progress or (lambda msg: log.info("%s", msg))
    if model.dtype != torch.float32:
        raise ExportError(f"export needs the model in float32 (it is {model.dtype}): load it with dtype=torch.float32; "
                          "lower precisions are made from the fp32 graph (ExportConfig.precisions)")
    model.eval()
    started = time.perf_counter()
    entries: dict[str, manifest_mod.ComponentEntry] = {}
    references = verify_mod.reference_cases(model, config.components) if config.verify else None
    lower = [p for p in config.precisions if p is not Precision.FP32]
    calibration = verify_mod.calibration_feeds(model, config.components) if lower else None
    with atomic_path(out_dir, overwrite=overwrite, directory=True, kind="export") as tmp:
        for component in config.components:
            spec = COMPONENT_SPECS[component]
            say(f"{component}: exporting with {config.exporter} at opset {config.opset}")
            base = export_component_fp32(model, component, config, tmp / f".scratch-{component}")
            cases = references[component] if references is not None else None
            files: dict[str, manifest_mod.GraphFile] = {}
            for precision in config.precisions:
                name = contract.graph_filename(component, precision.value)
                path = tmp / name
                rule_info: dict[str, Any] | None = None
                if precision is Precision.FP32:
                    proto = base
                else:
                    say(f"{component}: converting to {precision.value}")
                    selection = select_fp32_nodes(base, calibration[component], config.fp16_rule, tmp)
                    proto = convert_precision(base, precision, selection.fp32_nodes, io_low=config.fp16_rule.low_io)
                    set_metadata(proto, precision=precision.value)
                    rule_info = selection.as_dict()
                external = save_graph(proto, path, external_data_threshold=config.external_data_threshold)
                issues = verify_mod.check_tensorrt_ready(proto)
                if issues:
                    raise ExportError(f"{name} is not TensorRT-ready:\n  " + "\n  ".join(issues))
                verified: dict[str, Any] = {"status": "skipped"}
                if cases is not None:
                    say(f"{component}: verifying {name} in ONNX Runtime against PyTorch")
                    report = verify_mod.verify_graph(path, component, precision, cases)
                    verified = report.as_dict()
                    if not report.passed:
                        raise ExportError(f"verification of {name} failed (tolerance exceeded: {report.tolerance}):\n"
                                          + verify_mod.format_table(report.comparisons))
                files[precision.value] = manifest_mod.GraphFile.describe(
                    path, precision=precision.value, external_data=external, verified=verified,
                    fp16_rule=rule_info, model=proto)
                del proto
            entries[component] = manifest_mod.ComponentEntry.from_spec(spec, model.config, files)
            del base
        manifest = manifest_mod.build_manifest(model, entries, opset=config.opset, exporter=config.exporter,
                                               seconds=time.perf_counter() - started)
        manifest_mod.write_manifest(tmp, manifest)
    say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s")
    return manifest_mod.load_manifest(out_dir)


__all__ = ["ExportConfig", "EncoderGraph", "DecoderGraph", "export_model",
           "export_component_fp32", "clean_graph", "simplify", "save_graph",
           "check_opset", "parse_components", "parse_precisions"]

"""The export contract: graph names, tensor names, dynamic axes and file names shared by export and runtime.

The runtime depends on exactly these constants; change them only together with ``FORMAT``.

* ``encoder.onnx``: input ``video`` (B,3,T,H,W) -> outputs ``mean`` and ``logvar`` (B,z,t,h,w), the RAW moments
  split in two. The logvar clamp to ``LOGVAR_CLAMP`` is NOT in the graph: the runtime blends tiles on the raw
  moments and clamps afterwards, as the official code does (spec 6.1, 6.4).
* ``decoder.onnx``: input ``latent`` (B,z,t,h,w) -> output ``video`` (B,3,T,H,W).
* Every axis except channels is dynamic, with the symbolic names below.
* Other precisions: ``encoder.fp16.onnx`` etc. (``graph_filename``); weights above the external-data threshold go to
  ``<file>.data`` beside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cvvae.errors import InputError

FORMAT = "cvvae-export/1"
MANIFEST_NAME = "manifest.json"

OPSET_MIN, OPSET_MAX = 17, 20
# 19: what NVIDIA's diffusion demo exports with; every opset 17-20 gives the same operators for this model
# (GroupNorm lowers to InstanceNormalization, SiLU to Sigmoid*Mul, attention to MatMul+Softmax), and 19/20 keep
# the newest Pad/Resize/Cast versions that TensorRT 10 parses. Opset 21 would allow GroupNormalization-21.
DEFAULT_OPSET = 19

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"

# The official posterior clamp (cvvae.model.LOGVAR_MIN/MAX; spelled out so that the CLI imports without torch).
LOGVAR_CLAMP = (-30.0, 20.0)

ENCODER = "encoder"
DECODER = "decoder"
COMPONENTS = (ENCODER, DECODER)

# Tensor names (graph I/O)
ENCODER_INPUT = "video"
ENCODER_OUTPUTS = ("mean", "logvar")
DECODER_INPUT = "latent"
DECODER_OUTPUT = "video"

PIXEL_AXES = ("batch", None, "frames", "height", "width")
LATENT_AXES = ("batch", None, "latent_frames", "latent_height", "latent_width")

EXTERNAL_DATA_SUFFIX = ".data"
# Protobuf cannot serialise a message over 2 GiB; stay well below it.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name and the symbolic name of each axis (None: the static channel axis)."""

    name: str
    axes: tuple[str | None, ...]
    kind: str  # "pixels" or "latent": which channel count the static axis has

    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if a is not None}

    def dims(self, channels: int) -> list[str | int]:
        return [channels if a is None else a for a in self.axes]


class NamedIO:
    """``input_names``/``output_names`` of anything with ``inputs`` and ``outputs`` of named tensors."""

    inputs: Any
    outputs: Any

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ComponentSpec(NamedIO):
    """Names and axes of one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}


ENCODER_SPEC = ComponentSpec(
    ENCODER,
    inputs=(TensorSpec(ENCODER_INPUT, PIXEL_AXES, "pixels"),),
    outputs=tuple(TensorSpec(n, LATENT_AXES, "latent") for n in ENCODER_OUTPUTS),
)
DECODER_SPEC = ComponentSpec(
    DECODER,
    inputs=(TensorSpec(DECODER_INPUT, LATENT_AXES, "latent"),),
    outputs=(TensorSpec(DECODER_OUTPUT, PIXEL_AXES, "pixels"),),
)
COMPONENT_SPECS = {ENCODER: ENCODER_SPEC, DECODER: DECODER_SPEC}


def graph_filename(component: str, precision: str) -> str:
    """``encoder.onnx`` for fp32, ``encoder.fp16.onnx`` (``.bf16``, ``.int8``) for the others."""
    if component not in COMPONENT_SPECS:
        raise InputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    return f"{component}.onnx" if precision == "fp32" else f"{component}.{precision}.onnx"


FRAME_RULES = {
    "text": (
        "T frames encode to 1+(T-1)//4 latent frames (1+4k frames give 1+k latents; up to 3 trailing frames give "
        "no latent of their own); L latent frames decode to 4(L-1)+1 frames. Sizes divide by 8 (H, W multiples of 8). "
        "The runtime pads a video to 1+4k frames and multiples of 8 before encoding and crops after decoding."
    ),
    "latent_frames": "1 + (T - 1) // time_compress",
    "output_frames": "time_compress * (L - 1) + 1",
    "latent_size": "H / spatial_compress, W / spatial_compress (H, W multiples of spatial_compress)",
    "output_size": "h * spatial_compress, w * spatial_compress",
    "pad_frames_to": "1 + time_compress * k",
    "pad_size_to_multiple_of": "spatial_compress",
}

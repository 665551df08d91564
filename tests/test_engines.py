"""Engine profiles, sidecars, staleness and trtexec lines: everything of cvvae.engines that runs without TensorRT.

One tiny export (random tiny-v1, fp32 + fp16, no verification) serves the module. Builds are exercised with the
TensorRT call replaced by fixed bytes and a fake environment, so the bookkeeping around a build (sidecar, engine-dir
manifest, current/stale decisions) is tested here; real builds are in test_engines_gpu.py.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cvvae.engines import build
from cvvae.engines.profile import (AxisProfile, Profile, ProfileError, ProfileSpec, ShapeOutsideProfileError,
                                   ShapeTuple, choose_profile, default_spec, resolve_profiles)
from cvvae.engines.sidecar import (EngineDirError, EngineEnvironment, EngineSidecar, StaleEngineError, check_current,
                                   load_engine_dir, stale_reasons)
from cvvae.extras import is_installed

REPO = Path(__file__).resolve().parents[1]

H100 = EngineEnvironment(tensorrt_version="10.8.0.43", cuda_version="12.8", gpu_name="NVIDIA H100 80GB HBM3",
                         compute_capability="9.0")


@pytest.fixture(scope="module")
def export_dir(shared_exports) -> Path:
    return shared_exports.get("tiny-v1", ("fp32", "fp16"))


@pytest.fixture(scope="module")
def manifest(export_dir):
    from cvvae.export.manifest import load_manifest

    return load_manifest(export_dir)


TWO_PROFILES = """
[encoder]
batch = [1, 1, 1]

[[encoder.profiles]]
name = "chunk"
frames = [1, 17, 17]
height = [8, 64, 64]
width = [8, 64, 64]

[[encoder.profiles]]
name = "image"
frames = 1
height = [8, 32, 64]
width = [8, 32, 64]
"""


def two_profile_encoder(manifest) -> list[Profile]:
    spec = ProfileSpec.from_dict(__import__("tomllib").loads(TWO_PROFILES))
    return resolve_profiles(spec.for_component("encoder"), manifest.component("encoder").inputs, component="encoder")


# ----- profiles -------------------------------------------------------------------------------------------------------
def test_default_profiles_follow_the_plan(manifest):
    # tiny-v1: chunk_frames 16, tile 64 px, spatial x8, time x4
    spec = default_spec(manifest)
    (enc,) = spec.for_component("encoder")
    (dec,) = spec.for_component("decoder")
    assert enc.axes == {"batch": (1, 1, 1), "frames": (1, 17, 17), "height": (8, 64, 64), "width": (8, 64, 64)}
    assert dec.axes == {"batch": (1, 1, 1), "latent_frames": (1, 5, 5), "latent_height": (1, 8, 8),
                        "latent_width": (1, 8, 8)}
    (video,) = resolve_profiles(spec.for_component("encoder"), manifest.component("encoder").inputs,
                                component="encoder")
    assert video["video"] == ShapeTuple((1, 3, 1, 8, 8), (1, 3, 17, 64, 64), (1, 3, 17, 64, 64))
    (latent,) = resolve_profiles(spec.for_component("decoder"), manifest.component("decoder").inputs,
                                 component="decoder")
    assert latent["latent"] == ShapeTuple((1, 4, 1, 1, 1), (1, 4, 5, 8, 8), (1, 4, 5, 8, 8))


def test_default_spec_options(manifest):
    spec = default_spec(manifest, batch=(1, 2, 4), image_profile=True, components=["encoder"])
    assert list(spec.components) == ["encoder"]
    chunk, image = spec.for_component("encoder")
    assert chunk.axes["batch"] == image.axes["batch"] == (1, 2, 4)
    assert (image.name, image.axes["frames"]) == ("image", (1, 1, 1))


def test_example_toml_is_the_default_for_the_released_model():
    from cvvae.config import preset
    from cvvae.plan import PlanSettings

    cfg = preset("cvvae-v1")
    fake = SimpleNamespace(model_config=lambda: cfg, plan_settings=lambda: PlanSettings.from_config(cfg),
                           components={"encoder": None, "decoder": None})
    assert ProfileSpec.from_toml(REPO / "configs/profiles/default.toml") == default_spec(fake, image_profile=True)


def test_toml_round_trip(tmp_path):
    spec = ProfileSpec.from_dict(__import__("tomllib").loads(TWO_PROFILES))
    assert spec.for_component("encoder")[1].axes == {"batch": (1, 1, 1), "frames": (1, 1, 1), "height": (8, 32, 64),
                                                     "width": (8, 32, 64)}
    path = tmp_path / "p.toml"
    path.write_text(spec.to_toml())
    assert ProfileSpec.from_toml(path) == spec


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[encoder.profiles]]\nname = "x"\nframes = [17, 1, 17]\n')
    with pytest.raises(ProfileError, match=r"axis 'frames' = \[17, 1, 17\] must satisfy 1 <= min <= opt <= max"):
        ProfileSpec.from_toml(bad)
    bad.write_text('[[encoder.profiles]]\nframes = [1, 17]\n')
    with pytest.raises(ProfileError, match=r"encoder.profiles\[profile0\].frames must be \[min, opt, max\]"):
        ProfileSpec.from_toml(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        ProfileSpec.from_toml(tmp_path / "missing.toml")


def test_unknown_input_names_are_rejected_with_the_list():
    profile = Profile("chunk").add("vidoe", (1, 3, 1, 8, 8), (1, 3, 17, 64, 64), (1, 3, 17, 64, 64))
    with pytest.raises(ProfileError) as e:
        profile.check_inputs(["video"], what="the encoder graph")
    assert str(e.value) == ("profile 'chunk' names input(s) 'vidoe' that the encoder graph does not have; "
                            "its inputs are: video")


def test_unknown_axis_names_are_rejected_with_the_list(manifest):
    spec = ProfileSpec({"encoder": (AxisProfile("p", {"batch": (1, 1, 1), "frames": (1, 17, 17),
                                                      "height": (8, 64, 64), "widht": (8, 64, 64)}),)})
    with pytest.raises(ProfileError) as e:
        resolve_profiles(spec.for_component("encoder"), manifest.component("encoder").inputs, component="encoder")
    assert str(e.value) == ("encoder profile 'p': unknown axis 'widht'; the encoder graph's dynamic axes are: "
                            "batch, frames, height, width")


def test_shape_tuple_checks():
    with pytest.raises(ProfileError, match=r"axes \[2\] violate min <= opt <= max"):
        ShapeTuple((1, 3, 17), (1, 3, 1), (1, 3, 17))
    with pytest.raises(ProfileError, match="same rank"):
        ShapeTuple((1, 3), (1, 3, 1), (1, 3, 17))


def test_smallest_containing_profile_is_chosen(manifest):
    chunk, image = two_profile_encoder(manifest)
    big = Profile("big").add("video", (1, 3, 1, 8, 8), (1, 3, 17, 128, 128), (1, 3, 17, 128, 128))
    profiles = [big, chunk, image]
    assert choose_profile(profiles, {"video": (1, 3, 1, 32, 32)}) == 2     # all three contain it; image is smallest
    assert choose_profile(profiles, {"video": (1, 3, 5, 64, 64)}) == 1     # chunk, not big
    assert choose_profile(profiles, {"video": (1, 3, 17, 96, 64)}) == 0    # only big
    assert choose_profile([chunk, chunk], {"video": (1, 3, 5, 8, 8)}) == 0  # tie: the first


def test_shape_outside_every_profile_names_input_shape_ranges_and_the_fix(manifest):
    profiles = two_profile_encoder(manifest)
    dims = {t.name: t.dims for t in manifest.component("encoder").inputs}
    with pytest.raises(ShapeOutsideProfileError) as e:
        choose_profile(profiles, {"video": (1, 3, 17, 72, 64)}, engine="encoder.fp16.plan", axis_names=dims)
    assert str(e.value) == (
        "encoder.fp16.plan: input 'video' of shape 1x3x17x72x64 is outside every optimization profile:\n"
        "  profile 0 'chunk': min 1x3x1x8x8, opt 1x3x17x64x64, max 1x3x17x64x64 (axis 3 = 72 not in [8, 64])\n"
        "  profile 1 'image': min 1x3x1x8x8, opt 1x3x1x32x32, max 1x3x1x64x64 "
        "(axis 2 = 17 not in [1, 1]; axis 3 = 72 not in [8, 64])\n"
        "Add a profile that covers it to the profiles TOML and rebuild (cvvae build-engines --profiles FILE "
        "--rebuild), e.g.\n"
        "    [[encoder.profiles]]\n"
        '    name = "custom"\n'
        "    batch = [1, 1, 1]\n"
        "    frames = [1, 17, 17]\n"
        "    height = [8, 72, 72]\n"
        "    width = [8, 64, 64]\n"
        "Or make the runtime's chunks and tiles fit the engine (--tile-size, --chunk-frames; batch > 1 comes from "
        "--batch-tiles)."
    )


def test_batch_outside_profile_without_axis_names():
    p = Profile("chunk").add("latent", (1, 4, 1, 1, 1), (1, 4, 5, 8, 8), (1, 4, 5, 8, 8))
    with pytest.raises(ShapeOutsideProfileError, match=r"axis 0 = 4 not in \[1, 1\]") as e:
        choose_profile([p], {"latent": (4, 4, 5, 8, 8)}, engine="decoder.fp32.plan")
    assert "Add a profile with latent: min 1x4x1x1x1, opt 4x4x5x8x8, max 4x4x5x8x8" in str(e.value)


# ----- memory estimate ------------------------------------------------------------------------------------------------
def test_memory_estimate_by_hand(manifest):
    (profile,) = resolve_profiles(default_spec(manifest).for_component("encoder"),
                                  manifest.component("encoder").inputs, component="encoder")
    est = build.estimate_memory(manifest, "encoder", "fp32", [profile])
    # widths (32, 64, 64, 64); largest map: level 0, 32 ch x 17 frames x 64 x 64 fp32
    assert est.feature_map == "level 0: 32ch x 17f x 64x64"
    assert est.feature_map_bytes == 32 * 17 * 64 * 64 * 4 == 8_912_896
    # mid attention: T 17 -> 9 -> 9 -> 5 frames of 8x8 = 64 tokens: 5 * 64^2 scores
    assert est.attention_bytes == 5 * 64 * 64 * 4
    assert est.activation_bytes == 3 * 8_912_896 + 81_920
    # video 1x3x17x64x64 + mean and logvar 1x4x5x8x8, all float32
    assert est.io_bytes == (3 * 17 * 64 * 64 + 2 * 4 * 5 * 8 * 8) * 4
    assert est.weights_bytes == manifest.graph_file("encoder", "fp32").size_bytes
    assert est.total_bytes == est.weights_bytes + est.io_bytes + est.activation_bytes


# ----- sidecars and staleness -----------------------------------------------------------------------------------------
SIDECAR = {"environment": H100.as_dict(), "onnx": {"sha256": "a" * 64}, "engine": {"sha256": "e" * 64}}


@pytest.mark.parametrize("field,value,line", [
    ("tensorrt_version", "10.3.0.26", "TensorRT version: built with '10.8.0.43', now '10.3.0.26'"),
    ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU: built with 'NVIDIA H100 80GB HBM3', now 'NVIDIA A100-SXM4-80GB'"),
    ("compute_capability", "8.0", "compute capability: built with '9.0', now '8.0'"),
])
def test_environment_mismatch_is_refused(field, value, line):
    env = {**H100.as_dict(), field: value}
    with pytest.raises(StaleEngineError) as e:
        check_current(SIDECAR, env, engine="eng/encoder.fp16.plan", rebuild_hint="cvvae build-engines ... --rebuild",
                      onnx_sha256="a" * 64)
    assert str(e.value) == ("engine eng/encoder.fp16.plan was built for something else and is refused:\n"
                            f"  {line}\nRebuild it: cvvae build-engines ... --rebuild")


def test_onnx_sha_mismatch_is_refused():
    with pytest.raises(StaleEngineError, match=f"  ONNX sha256: built with '{'a' * 64}', now '{'b' * 64}'"):
        check_current(SIDECAR, H100.as_dict(), engine="x", rebuild_hint="-", onnx_sha256="b" * 64)


def test_cuda_version_difference_is_tolerated_and_reported():
    env = {**H100.as_dict(), "cuda_version": "12.9"}
    (m,) = check_current(SIDECAR, env, engine="x", rebuild_hint="-", onnx_sha256="a" * 64, engine_sha256="e" * 64)
    assert (str(m), m.refuse) == ("CUDA version: built with '12.8', now '12.9'", False)


def test_all_reasons_are_listed():
    env = {**H100.as_dict(), "tensorrt_version": "11.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    reasons = stale_reasons(SIDECAR, env, onnx_sha256="b" * 64, engine_sha256="f" * 64)
    assert [r.what for r in reasons] == ["TensorRT version", "GPU", "compute capability", "ONNX sha256",
                                         "engine file sha256 (plan file replaced after the build)"]
    assert stale_reasons(SIDECAR, H100.as_dict(), onnx_sha256="a" * 64, engine_sha256="e" * 64) == []


# ----- trtexec --------------------------------------------------------------------------------------------------------
def test_trtexec_line_for_a_two_profile_encoder(manifest, export_dir, tmp_path):
    b = build.EngineBuilder(component="encoder", precision="fp16", onnx_path=Path("exp/encoder.fp16.onnx"),
                            onnx_sha256="0" * 64, engine_path=Path("eng/encoder.fp16.plan"),
                            profiles=tuple(two_profile_encoder(manifest)),
                            options=build.BuildOptions(workspace_mb=2048, opt_level=4),
                            timing_cache=Path("eng/timing.timing_cache"))
    assert b.trtexec_line() == (
        "trtexec --onnx=exp/encoder.fp16.onnx --saveEngine=eng/encoder.fp16.plan --stronglyTyped --noTF32 "
        "--minShapes=video:1x3x1x8x8 --optShapes=video:1x3x17x64x64 --maxShapes=video:1x3x17x64x64 "
        "--minShapes=video:1x3x1x8x8 --optShapes=video:1x3x1x32x32 --maxShapes=video:1x3x1x64x64 "
        "--builderOptimizationLevel=4 --memPoolSize=workspace:2048M --timingCacheFile=eng/timing.timing_cache "
        "--skipInference"
    )


def test_print_trtexec_cli_without_tensorrt(export_dir, tmp_path):
    from cvvae.cli import main

    profiles = tmp_path / "two.toml"
    profiles.write_text(TWO_PROFILES)
    out = tmp_path / "eng"
    result = CliRunner().invoke(main, ["build-engines", "--export", str(export_dir), "--out", str(out),
                                       "--components", "encoder", "--profiles", str(profiles), "--print-trtexec"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("trtexec ")]
    assert len(lines) == 1
    assert shlex.split(lines[0])[1:3] == [f"--onnx={export_dir / 'encoder.fp16.onnx'}",
                                          f"--saveEngine={out / 'encoder.fp16.plan'}"]
    assert "memory estimate ~" in result.stderr
    # printing builds no engine; it writes the sidecar of the one the command will build, and the directory manifest
    assert sorted(p.name for p in out.iterdir()) == ["encoder.fp16.plan.json", "manifest.json"]
    side = EngineSidecar.read(out / "encoder.fp16.plan.json")
    assert side.build["builder"] == "trtexec" and side.build["command"] == shlex.split(lines[0])
    assert side.engine == {"file": "encoder.fp16.plan", "sha256": None, "size_bytes": None}
    assert [p["name"] for p in side.profiles] == ["chunk", "image"]


@pytest.mark.skipif(is_installed("tensorrt"), reason="checks the message shown when TensorRT is absent")
def test_build_without_tensorrt_fails_with_the_alternative(export_dir, tmp_path):
    from cvvae.cli import main

    result = CliRunner().invoke(main, ["build-engines", "--export", str(export_dir), "--out", str(tmp_path / "e")])
    assert result.exit_code != 0
    assert "TensorRT is not installed here" in result.output and "--print-trtexec" in result.output


def test_precision_missing_from_export(export_dir, tmp_path):
    with pytest.raises(build.EngineBuildError, match=r"has no int8 encoder graph \(it has fp32, fp16\)"):
        build.plan_engines(export_dir, tmp_path, "int8")


# ----- the bookkeeping of a build (TensorRT replaced by fixed bytes) --------------------------------------------------
@pytest.fixture
def fake_trt_build(monkeypatch):
    calls = []

    def fake_build(self, cache_bytes=None):
        calls.append((self.engine_path.name, cache_bytes))
        return f"engine {self.engine_path.name}".encode(), b"timing cache"

    monkeypatch.setattr(build.EngineBuilder, "build", fake_build)
    return calls


def test_build_writes_engines_sidecars_and_manifest(export_dir, manifest, tmp_path, fake_trt_build):
    out = tmp_path / "eng"
    results = build.build_engines(export_dir, out, "fp16", environment=H100)
    assert [(r.component, r.status) for r in results] == [("encoder", "built"), ("decoder", "built")]
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.fp16.plan", "decoder.fp16.plan.json", "encoder.fp16.plan", "encoder.fp16.plan.json",
        "manifest.json", "timing.timing_cache", "timing.timing_cache.json"]
    side = EngineSidecar.read(out / "encoder.fp16.plan.json")
    assert side.onnx["sha256"] == manifest.graph_file("encoder", "fp16").sha256
    assert side.environment == H100.as_dict()
    assert side.io["video"] == {"mode": "input", "dtype": "float16", "dims": ["batch", 3, "frames", "height", "width"]}
    assert side.profiles == [{"name": "chunk", "shapes": {"video": {"min": [1, 3, 1, 8, 8], "opt": [1, 3, 17, 64, 64],
                                                                      "max": [1, 3, 17, 64, 64]}}}]
    assert (side.build["opt_level"], side.build["strongly_typed"], side.build["tf32"],
            side.build["timing_cache_loaded"]) == (3, True, False, False)
    d = load_engine_dir(out)
    assert d.engine_path("decoder", "fp16") == out / "decoder.fp16.plan"
    assert d.export_manifest().model_config() == manifest.model_config()
    assert d.export_manifest().plan_settings() == manifest.plan_settings()
    assert d.checkpoint == {"source": "random:tiny-v1", "sha256": None, "config_source": "preset"}
    assert d.expected_onnx_sha256("encoder", "fp16") == side.onnx["sha256"]
    with pytest.raises(EngineDirError, match=r"has no fp32 encoder engine \(it has: encoder.fp16, decoder.fp16\)"):
        d.engine_path("encoder", "fp32")

    # a second run keeps current engines; the timing cache made here is then loaded
    again = build.build_engines(export_dir, out, "fp16", environment=H100)
    assert [r.status for r in again] == ["current", "current"] and len(fake_trt_build) == 2
    # another GPU: refused without --rebuild, rebuilt with it (and the other GPU's timing cache is not used)
    l4 = EngineEnvironment("10.8.0.43", "12.8", "NVIDIA L4", "8.9")
    with pytest.raises(StaleEngineError, match=r"GPU: built with 'NVIDIA H100 80GB HBM3', now 'NVIDIA L4'"):
        build.build_engines(export_dir, out, "fp16", environment=l4)
    assert [r.status for r in build.build_engines(export_dir, out, "fp16", environment=l4, rebuild=True)] == \
        ["built", "built"]
    # the H100 cache is not given to the first L4 build; the cache that build wrote is given to the next one
    assert fake_trt_build[-2:] == [("encoder.fp16.plan", None), ("decoder.fp16.plan", b"timing cache")]
    assert EngineSidecar.read(out / "decoder.fp16.plan.json").environment["gpu_name"] == "NVIDIA L4"
    # changed profiles are a different build request
    with pytest.raises(StaleEngineError, match="profiles: built with"):
        build.build_engines(export_dir, out, "fp16", environment=l4,
                            spec=default_spec(manifest, batch=(1, 1, 2)))


def test_replaced_plan_file_is_refused(export_dir, tmp_path, fake_trt_build):
    out = tmp_path / "eng"
    build.build_engines(export_dir, out, "fp32", environment=H100, components=["decoder"])
    (out / "decoder.fp32.plan").write_bytes(b"built elsewhere by trtexec")
    with pytest.raises(StaleEngineError, match=r"engine file sha256 \(plan file replaced after the build\)"):
        build.build_engines(export_dir, out, "fp32", environment=H100, components=["decoder"])


def test_an_export_dir_is_not_an_engine_dir(export_dir):
    with pytest.raises(EngineDirError, match="that is an export directory: build engines from it"):
        load_engine_dir(export_dir)


@pytest.mark.skipif(is_installed("tensorrt"), reason="checks the message shown when TensorRT is absent")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(tmp_path):
    from cvvae.errors import BackendUnavailableError
    from cvvae.runtime.backends import BACKENDS

    with pytest.raises(BackendUnavailableError, match="the tensorrt backend needs the 'tensorrt' package"):
        BACKENDS["tensorrt"](tmp_path, device="cuda", precision="fp16")


def test_engines_import_without_tensorrt():
    import subprocess
    import sys

    code = "import cvvae.engines, cvvae.engines.build, cvvae.engines.trt_backend, sys; print('tensorrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_tensorrt_and_onnxruntime_backends_share_the_graph_file_base():
    """Config, plan, identity and the component calls come from cvvae.backend.GraphFileBackend for both backends:
    the TensorRT one (engines replaced by a fake that answers by tensor name) agrees with ONNX Runtime's."""
    import numpy as np

    from cvvae.backend import GraphFileBackend
    from cvvae.default_model import DEFAULT_GRAPHS
    from cvvae.engines.trt_backend import TensorRTBackend
    from cvvae.errors import InputError
    from cvvae.runtime.backends import OnnxRuntimeBackend

    ort = OnnxRuntimeBackend.load(DEFAULT_GRAPHS, components=("encoder",), threads=1)

    class FakeEngine:  # TrtEngine's calling convention: feeds by input name -> outputs by name
        inputs, outputs = ["video"], ["logvar", "mean"]  # not the contract's order: names must be used

        def __call__(self, feeds):
            (x,) = feeds.values()
            mean, logvar = ort.run("encoder", x)
            return {"logvar": logvar, "mean": mean}

    engine_dir = SimpleNamespace(export_manifest=lambda: ort.manifest)
    trt = TensorRTBackend(Path("engines"), engine_dir, FakeEngine(), None, "fp32", H100)
    assert isinstance(trt, GraphFileBackend) and isinstance(ort, GraphFileBackend)
    assert (trt.config, trt.plan_settings, trt.identity) == (ort.config, ort.plan_settings, ort.identity)
    assert trt.identity["model_sha256"] == ort.manifest.checkpoint["sha256"]
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 5, 16, 24)).astype(np.float32)
    moments = trt.encoder(x)
    assert moments.shape == (1, 2 * ort.config.latent_channels, 2, 2, 3)
    np.testing.assert_array_equal(moments, ort.encoder(x))
    with pytest.raises(InputError, match="^the decoder engine was not loaded; pass components including 'decoder'$"):
        trt.decoder(moments[:, : ort.config.latent_channels])
    with pytest.raises(InputError, match="^the decoder graph was not loaded; pass components including 'decoder'$"):
        ort.decoder(moments[:, : ort.config.latent_channels])
    with pytest.raises(InputError, match=r"components \['encodr'\]: expected one or both of encoder, decoder"):
        OnnxRuntimeBackend.load(DEFAULT_GRAPHS, components=("encodr",))


def test_sidecar_json_round_trip(tmp_path):
    side = EngineSidecar(component="decoder", precision="fp32", engine={"file": "decoder.fp32.plan"}, onnx={},
                         io={}, profiles=[], build={}, environment=H100.as_dict(), cvvae_version="0.1.0")
    path = side.write(tmp_path / "decoder.fp32.plan.json")
    assert json.loads(path.read_text())["format"] == "cvvae-engine/1"
    assert EngineSidecar.read(path) == side
    with pytest.raises(StaleEngineError, match="has no sidecar encoder.fp32.plan.json"):
        EngineSidecar.read(tmp_path / "encoder.fp32.plan.json")


# ----- engines built with trtexec: sidecars at print time, checked and recorded at first load -------------------------
class FakeEngine:
    """The ICudaEngine inspection methods engine_check uses, over plain data (DataType names spelled as TensorRT's)."""

    def __init__(self, tensors: dict[str, tuple[str, str, list[int]]], profiles: list[dict[str, tuple]]) -> None:
        self.tensors, self.profiles = tensors, profiles

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> str:
        return FAKE_TRT.TensorIOMode.INPUT if self.tensors[name][0] == "input" else FAKE_TRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self.tensors[name][1])

    def get_tensor_shape(self, name: str) -> list[int]:
        return self.tensors[name][2]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_profile_shape(self, name: str, k: int) -> tuple:
        return self.profiles[k][name]


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))
TRT_NAMES = {"float32": "FLOAT", "float16": "HALF"}


def engine_like(side: EngineSidecar) -> FakeEngine:
    """What TensorRT would report for the engine that side's trtexec command builds."""
    tensors = {n: (t["mode"], TRT_NAMES[t["dtype"]], [d if isinstance(d, int) else -1 for d in t["dims"]])
               for n, t in side.io.items()}
    profiles = [{n: tuple(tuple(s[k]) for k in ("min", "opt", "max")) for n, s in p["shapes"].items()}
                for p in side.profiles]
    return FakeEngine(tensors, profiles)


@pytest.fixture
def trtexec_dir(export_dir, tmp_path) -> Path:
    """An engine directory made by `--print-trtexec` (fp16 decoder), with a plan file as trtexec would write it."""
    from cvvae.cli import main

    out = tmp_path / "eng"
    result = CliRunner().invoke(main, ["build-engines", "--export", str(export_dir), "--out", str(out),
                                       "--components", "decoder", "--print-trtexec"])
    assert result.exit_code == 0, result.output
    (out / "decoder.fp16.plan").write_bytes(b"plan written by trtexec")
    return out


def open_decoder(out: Path, engines: dict[bytes, FakeEngine], env: EngineEnvironment = H100,
                 onnx_sha256: str | None = None):
    """engine_check.open_engine as the tensorrt backend calls it, with TensorRT's deserializer replaced by a dict."""
    from cvvae.engines.engine_check import expected_io, open_engine

    manifest = load_engine_dir(out)
    deserialized = []

    def deserialize(data: bytes):
        deserialized.append(data)
        return engines.get(data)

    opened = open_engine(out / "decoder.fp16.plan", trt=FAKE_TRT, deserialize=deserialize, environment=env,
                         expected_onnx_sha256=onnx_sha256 or manifest.expected_onnx_sha256("decoder", "fp16"),
                         export_io=expected_io(manifest.export_manifest(), "decoder", "fp16"),
                         rebuild_hint="cvvae build-engines ... --rebuild")
    return opened, deserialized


def test_print_trtexec_sidecar_says_what_the_command_builds(trtexec_dir, export_dir, manifest):
    side = EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json")
    assert side.onnx["sha256"] == manifest.graph_file("decoder", "fp16").sha256
    assert side.io == {"latent": {"mode": "input", "dtype": "float16",
                                  "dims": ["batch", 4, "latent_frames", "latent_height", "latent_width"]},
                       "video": {"mode": "output", "dtype": "float16",
                                 "dims": ["batch", 3, "frames", "height", "width"]}}
    assert side.profiles == [{"name": "chunk", "shapes": {"latent": {"min": [1, 4, 1, 1, 1], "opt": [1, 4, 5, 8, 8],
                                                                     "max": [1, 4, 5, 8, 8]}}}]
    assert side.build["command"][:3] == ["trtexec", f"--onnx={export_dir / 'decoder.fp16.onnx'}",
                                         f"--saveEngine={trtexec_dir / 'decoder.fp16.plan'}"]
    assert side.environment == {} and side.engine["sha256"] is None
    assert load_engine_dir(trtexec_dir).engines == {"decoder": {"fp16": {"file": "decoder.fp16.plan",
                                                                         "sidecar": "decoder.fp16.plan.json"}}}


def test_trtexec_engine_is_checked_then_recorded_at_first_load(trtexec_dir):
    import hashlib

    side = EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json")
    engines = {b"plan written by trtexec": engine_like(side)}
    opened, deserialized = open_decoder(trtexec_dir, engines)
    assert opened.recorded and opened.io.inputs == ["latent"] and opened.io.outputs == ["video"]
    recorded = EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json")
    assert recorded.engine["sha256"] == hashlib.sha256(b"plan written by trtexec").hexdigest()
    assert recorded.engine["size_bytes"] == 23 and recorded.environment == H100.as_dict()
    assert recorded.build == side.build and recorded.profiles == side.profiles
    # from now on it is verified like an engine built here: same bytes load, nothing more is recorded
    again, _ = open_decoder(trtexec_dir, engines)
    assert not again.recorded and again.sha256 == recorded.engine["sha256"]
    # a rebuilt plan file is refused before TensorRT sees it, with the command that rebuilds it and the reset
    (trtexec_dir / "decoder.fp16.plan").write_bytes(b"plan rebuilt later")
    with pytest.raises(StaleEngineError) as e:
        open_decoder(trtexec_dir, {b"plan rebuilt later": engine_like(side)})
    message = str(e.value)
    assert "engine file sha256 (plan file replaced since its first load recorded it)" in message
    assert "Rebuild it: run its sidecar's command (from " in message and "trtexec --onnx=" in message
    assert "--precision fp16 --print-trtexec --rebuild" in message
    # another GPU than the one recorded at first load: refused as any engine
    l4 = EngineEnvironment(H100.tensorrt_version, "12.8", "NVIDIA L4", "8.9")
    (trtexec_dir / "decoder.fp16.plan").write_bytes(b"plan written by trtexec")
    with pytest.raises(StaleEngineError, match="GPU: built with 'NVIDIA H100 80GB HBM3', now 'NVIDIA L4'"):
        open_decoder(trtexec_dir, engines, env=l4)


@pytest.mark.parametrize("change, expected", [
    (lambda e: e.tensors.update(video=("output", "FLOAT", [-1, 3, -1, -1, -1])),
     "I/O tensors: the engine has latent (input, float16), video (output, float32); its sidecar says latent (input, "
     "float16), video (output, float16)"),
    (lambda e: (setattr(e, "tensors", {"z": e.tensors["latent"], "video": e.tensors["video"]}),
                setattr(e, "profiles", [{"z": p["latent"]} for p in e.profiles])),
     "I/O tensors: the engine has z (input, float16), video (output, float16); its sidecar says latent (input, "
     "float16), video (output, float16)"),
    (lambda e: e.tensors.update(latent=("input", "HALF", [-1, 16, -1, -1, -1])),
     "tensor 'latent': the engine's dims are [-1, 16, -1, -1, -1]; its sidecar says ['batch', 4, 'latent_frames', "
     "'latent_height', 'latent_width']"),
    (lambda e: e.profiles[0].update(latent=((1, 4, 1, 1, 1), (1, 4, 5, 8, 8), (1, 4, 5, 16, 16))),
     "profile 0 of input 'latent': (min, opt, max) is (1x4x1x1x1, 1x4x5x8x8, 1x4x5x16x16) in the engine but "
     "(1x4x1x1x1, 1x4x5x8x8, 1x4x5x8x8) in its sidecar"),
    (lambda e: e.profiles.append(e.profiles[0]),
     "optimization profiles: the engine has 2; its sidecar lists 1"),
])
def test_foreign_trtexec_engine_is_refused_at_first_load(trtexec_dir, change, expected):
    sidecar_before = (trtexec_dir / "decoder.fp16.plan.json").read_bytes()
    foreign = engine_like(EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json"))
    change(foreign)
    with pytest.raises(StaleEngineError) as e:
        open_decoder(trtexec_dir, {b"plan written by trtexec": foreign})
    lines = str(e.value).splitlines()
    assert lines[0] == (f"engine {trtexec_dir / 'decoder.fp16.plan'} does not match its sidecar and export (a "
                        "foreign engine, or one built by another command; nothing was recorded):")
    assert f"  {expected}" in lines
    assert (trtexec_dir / "decoder.fp16.plan.json").read_bytes() == sidecar_before  # nothing recorded


def test_trtexec_engine_of_a_changed_graph_is_refused_before_deserializing(trtexec_dir):
    with pytest.raises(StaleEngineError, match=r"ONNX sha256: built with '[0-9a-f]{64}', now 'f{64}'"):
        open_decoder(trtexec_dir, {}, onnx_sha256="f" * 64)


def test_undeserializable_trtexec_engine_names_the_fix(trtexec_dir):
    from cvvae.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10\.8\.0\.43 could not deserialize .*decoder\.fp16"
                                                      r"\.plan \(built by another TensorRT version or for another "
                                                      r"GPU\?\); run its sidecar's command"):
        open_decoder(trtexec_dir, {})
    assert EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json").engine["sha256"] is None


def test_engine_built_here_is_checked_against_its_sidecar(export_dir, tmp_path, fake_trt_build):
    out = tmp_path / "eng"
    build.build_engines(export_dir, out, "fp16", environment=H100, components=["decoder"])
    side = EngineSidecar.read(out / "decoder.fp16.plan.json")
    plan = (out / "decoder.fp16.plan").read_bytes()
    opened, deserialized = open_decoder(out, {plan: engine_like(side)})
    assert not opened.recorded and deserialized == [plan]
    wrong = engine_like(side)
    wrong.profiles[0]["latent"] = ((1, 4, 1, 1, 1), (1, 4, 1, 1, 1), (1, 4, 1, 1, 1))
    with pytest.raises(StaleEngineError, match=r"\(its sidecar does not describe it\):\n  profile 0 of input 'latent'"):
        open_decoder(out, {plan: wrong})


def test_print_trtexec_again_keeps_a_recorded_sidecar_and_refuses_another_command(trtexec_dir, export_dir):
    from cvvae.cli import main

    side = EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json")
    open_decoder(trtexec_dir, {b"plan written by trtexec": engine_like(side)})
    recorded = (trtexec_dir / "decoder.fp16.plan.json").read_bytes()
    args = ["build-engines", "--export", str(export_dir), "--out", str(trtexec_dir), "--components", "decoder",
            "--print-trtexec"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "decoder.fp16.plan.json: sidecar current, kept" in result.stderr
    assert (trtexec_dir / "decoder.fp16.plan.json").read_bytes() == recorded
    # another command for the same plan file: refused, nothing changed; --rebuild writes a pending sidecar
    result = CliRunner().invoke(main, args + ["--batch", "1,1,2"])
    assert result.exit_code == 1
    assert f"{trtexec_dir / 'decoder.fp16.plan'} exists, made by trtexec for something else:" in result.stderr
    assert "profiles: built with 'chunk: latent 1x4x1x1x1..1x4x5x8x8', now 'chunk: latent 1x4x1x1x1..2x4x5x8x8'" \
        in result.stderr
    assert (trtexec_dir / "decoder.fp16.plan.json").read_bytes() == recorded
    result = CliRunner().invoke(main, args + ["--batch", "1,1,2", "--rebuild"])
    assert result.exit_code == 0, result.output
    fresh = EngineSidecar.read(trtexec_dir / "decoder.fp16.plan.json")
    assert fresh.engine["sha256"] is None and "--maxShapes=latent:2x4x5x8x8" in fresh.build["command"]
    assert (trtexec_dir / "decoder.fp16.plan").read_bytes() == b"plan written by trtexec"  # never deleted here


def test_print_trtexec_refuses_to_residecar_an_engine_built_here(export_dir, tmp_path, fake_trt_build):
    from cvvae.cli import main

    out = tmp_path / "eng"
    build.build_engines(export_dir, out, "fp16", environment=H100, components=["decoder"])
    before = (out / "decoder.fp16.plan.json").read_bytes()
    result = CliRunner().invoke(main, ["build-engines", "--export", str(export_dir), "--out", str(out),
                                       "--components", "decoder", "--print-trtexec"])
    assert result.exit_code == 1
    assert "exists, made by tensorrt-python for something else:\n  builder: built with 'tensorrt-python', now " \
           "'trtexec'" in result.stderr
    assert (out / "decoder.fp16.plan.json").read_bytes() == before


def test_build_engines_refuses_a_pending_trtexec_engine(trtexec_dir, export_dir, fake_trt_build):
    with pytest.raises(StaleEngineError, match="engine: built with 'a trtexec build whose first load has not "
                                               "checked and recorded it yet'"):
        build.build_engines(export_dir, trtexec_dir, "fp16", environment=H100, components=["decoder"])

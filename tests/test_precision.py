"""Precision policy (issue 16): `auto` with injected CPU/GPU capabilities, the bf16 first-tile guard, metadata."""

from __future__ import annotations

import logging

import pytest
import torch

from cvvae.precision import (MIN_BF16_PSNR_DB, RECORDED_BF16_PSNR, cpu_flags, native_bf16_cpu, recorded_bf16_psnr,
                             resolve_precision)
from cvvae.runtime import VideoVAE
from cvvae.runtime.backends import TorchBackend
from cvvae.runtime.precision_guard import Bf16Guard

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
SAPPHIRE = AVX2 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    choice = resolve_precision("auto", flags=AVX2)
    assert (choice.precision, choice.check_first_tile) == ("fp32", False)
    assert choice.describe() == "fp32 (auto: this CPU has no native bf16 (AVX512_BF16/AMX_BF16))"


@pytest.mark.parametrize("flags, flag", [(SAPPHIRE, "AVX512_BF16"), (AVX2 | {"amx_bf16"}, "AMX_BF16")])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(flags, flag):
    choice = resolve_precision("auto", flags=flags)
    assert (choice.precision, choice.check_first_tile) == ("bf16", True)
    assert choice.reason == f"this CPU has {flag}"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_bf16_support(supported, expected):
    assert resolve_precision("auto", device="cuda", cuda_bf16=supported, flags=AVX2).precision == expected


def test_auto_on_other_backends_and_explicit_precisions():
    assert resolve_precision("auto", backend="onnxruntime", flags=SAPPHIRE).precision == "fp32"
    assert resolve_precision("auto", backend="tensorrt").precision == "fp16"
    assert resolve_precision("bf16", flags=AVX2).describe() == "bf16"
    with pytest.raises(ValueError, match="precision 'fp64' is not one of auto, fp32, fp16, bf16, int8"):
        resolve_precision("fp64")


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert native_bf16_cpu(cpu_flags(info)) == "avx512_bf16"
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_recorded_bf16_accuracy_skips_the_check_only_above_the_threshold(monkeypatch, tiny_v1):
    monkeypatch.setitem(RECORDED_BF16_PSNR, "a" * 64, MIN_BF16_PSNR_DB + 10)
    monkeypatch.setitem(RECORDED_BF16_PSNR, "b" * 64, MIN_BF16_PSNR_DB - 1)
    assert recorded_bf16_psnr("a" * 64) == MIN_BF16_PSNR_DB + 10
    assert recorded_bf16_psnr("b" * 64) is None and recorded_bf16_psnr("0" * 64) is None and recorded_bf16_psnr(None) is None


@pytest.fixture()
def x():
    return torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_guard_keeps_bf16_when_the_first_tile_agrees(tiny_v1, x, caplog):
    choice = resolve_precision("auto", flags=SAPPHIRE)
    # random tiny weights lose ~44 dB in bf16 (below the 45 dB default: `auto` would fall back); 30 dB keeps bf16
    guard = Bf16Guard(TorchBackend(tiny_v1), choice, min_psnr_db=30.0)
    vae = VideoVAE(guard, tiny_v1.plan_settings(), precision_choice=choice)
    with caplog.at_level(logging.INFO, logger="cvvae.runtime.precision_guard"):
        latents = vae.encode(x)
    assert 30.0 <= guard.checked_psnr_db < 80 and guard.precision == "bf16" and guard.fp32 is None
    meta = latents.metadata
    assert meta["precision"] == "bf16" and meta["precision_requested"] == "auto"
    assert meta["precision_reason"] == f"this CPU has AVX512_BF16; bf16 first tile {guard.checked_psnr_db:.1f} dB from fp32"
    fp32 = VideoVAE(TorchBackend(tiny_v1), tiny_v1.plan_settings()).encode(x)
    assert (latents.mean - fp32.mean).abs().max().item() < 0.05  # bf16, not fp32 numbers ...
    assert (latents.mean - fp32.mean).abs().max().item() > 0     # ... but close to them


def test_guard_falls_back_to_fp32_below_the_threshold(tiny_v1, x, caplog):
    choice = resolve_precision("auto", flags=SAPPHIRE)
    guard = Bf16Guard(TorchBackend(tiny_v1), choice, min_psnr_db=200.0)  # no bf16 result reaches 200 dB
    vae = VideoVAE(guard, tiny_v1.plan_settings(), precision_choice=choice)
    with caplog.at_level(logging.WARNING, logger="cvvae.runtime.precision_guard"):
        latents = vae.encode(x)
    assert guard.precision == "fp32" and guard.bf16 is None
    assert "loses accuracy in bf16, running fp32" in caplog.text
    assert latents.metadata["precision"] == "fp32"
    assert latents.metadata["precision_reason"].endswith("below 200 dB: fell back to fp32")
    fp32 = VideoVAE(TorchBackend(tiny_v1), tiny_v1.plan_settings()).encode(x)
    assert torch.equal(latents.mean, fp32.mean)  # every chunk, the first included, is the fp32 result


def test_load_auto_records_the_choice_in_latents(x):
    vae = VideoVAE.load("random:tiny-v1", precision="auto")
    expected = "bf16" if native_bf16_cpu() else "fp32"
    latents = vae.encode(x)
    assert latents.metadata["precision"] == vae.backend.precision == expected
    assert latents.metadata["precision_requested"] == "auto"


def test_load_auto_on_a_bf16_cpu_trusts_the_recorded_default_model(monkeypatch):
    import cvvae.precision

    monkeypatch.setattr(cvvae.precision, "cpu_flags", lambda *a: SAPPHIRE)
    vae = VideoVAE.load(precision="auto")  # the shipped default model: its bf16 accuracy is recorded
    recorded = recorded_bf16_psnr(vae.backend.identity["model_sha256"])
    assert recorded is not None and recorded >= MIN_BF16_PSNR_DB
    assert not isinstance(vae.backend, Bf16Guard) and vae.backend.precision == "bf16"
    assert not vae.precision_choice.check_first_tile
    assert vae.precision_choice.reason.endswith(f"bf16 accuracy recorded for this checkpoint ({recorded:.1f} dB vs fp32)")


def test_load_auto_on_a_bf16_cpu_guards_an_unrecorded_checkpoint(monkeypatch, x):
    import cvvae.precision

    monkeypatch.setattr(cvvae.precision, "cpu_flags", lambda *a: SAPPHIRE)
    vae = VideoVAE.load("random:tiny-v1", precision="auto")
    assert isinstance(vae.backend, Bf16Guard) and vae.precision_choice.check_first_tile
    latents = vae.encode(x)
    assert latents.metadata["precision"] == vae.backend.precision
    assert latents.metadata["precision_reason"].startswith("this CPU has AVX512_BF16; bf16 first tile ")

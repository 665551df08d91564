"""Memory budget (issue 16): the one estimate in cvvae.plan, the plan that fits a budget, --max-memory parsing."""

from __future__ import annotations

import pytest
import torch

from cvvae.config import preset as get_preset
from cvvae.loading import create_model
from cvvae.memory import parse_bytes
from cvvae.plan import (MIN_TILE_PX, PlanError, PlanSettings, activation_elements,
                        estimate_memory, fit_plan, make_plan, weight_elements)
from cvvae.runtime import VideoVAE
from cvvae.runtime.backends import TorchBackend

GIB = 1 << 30


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-sd3"])
def test_weight_count_matches_the_model(preset):
    model = create_model(preset, seed=0)
    for direction, module in (("encode", model.encoder), ("decode", model.decoder)):
        real = sum(p.numel() for p in module.parameters())
        assert abs(weight_elements(model.config, direction) - real) / real < 0.01


def test_activation_count_scales_with_tile_area_and_frames():
    cfg = get_preset("cvvae-v1")
    base = activation_elements(cfg, "decode", 17, 256, 256)
    assert activation_elements(cfg, "decode", 17, 512, 512) == 4 * base
    # decoder level 0 at 17 frames x 256^2, 128 channels: 6 live tensors of a resnet (cvvae/blocks.py)
    assert base >= 6 * 128 * 17 * 256 * 256
    assert activation_elements(cfg, "encode", 17, 256, 256) >= 6 * 128 * 17 * 256 * 256


def test_sliced_layers_count_their_input_output_and_slices():
    cfg = get_preset("cvvae-v1")
    whole = activation_elements(cfg, "decode", 17, 256, 256)
    assert activation_elements(cfg, "decode", 17, 256, 256, slice_elements=whole) == whole  # no layer is above it
    sliced = activation_elements(cfg, "decode", 17, 256, 256, slice_elements=(64 << 20) // 4)
    level0 = 128 * 17 * 256 * 256  # a decoder activation at full resolution
    # a level-0 resnet holds its input and output, plus 4 slices of 2 frames (2 x 17 x 64 MiB / 544 MiB >= 64 MiB)
    assert sliced >= 2 * level0 + 4 * 2 * level0 // 17
    assert sliced < whole / 2


def test_the_torch_backend_is_estimated_sliced_unless_slicing_is_off(tiny_v1):
    from cvvae.plan import slice_bytes

    cfg = get_preset("cvvae-v1")
    plan = make_plan(PlanSettings(16, 256, 0.25), 17, 720, 1280)
    whole, sliced = (estimate_memory(cfg, plan, "decode", sliced=s) for s in (False, True))
    assert sliced.total < whole.total and sliced.weights == whole.weights and sliced.io == whole.io
    with slice_bytes(None):  # CVVAE_SLICE_BYTES=0
        assert estimate_memory(cfg, plan, "decode", sliced=True) == whole
    small = make_plan(PlanSettings(16, 64, 0.25), 17, 64, 64)  # no tensor reaches a slice: the whole-layer figure
    assert estimate_memory(cfg, small, "decode", sliced=True) == estimate_memory(cfg, small, "decode")
    assert VideoVAE(TorchBackend(tiny_v1)).sliced
    # under the same budget the sliced estimate keeps tiles at least as large
    settings = PlanSettings.from_config(cfg)
    tile = {s: fit_plan(cfg, settings, 17, 720, 1280, 6 * GIB, ("decode",), sliced=s)[0].tile_size
            for s in (False, True)}
    assert tile[True] > tile[False]


def test_estimate_of_the_full_size_720p_decode():
    cfg = get_preset("cvvae-v1")
    plan = make_plan(PlanSettings.from_config(cfg), 17, 720, 1280)
    est = estimate_memory(cfg, plan, "decode")
    assert est.tile_px == (576, 576) and est.chunk_frames == 17
    assert est.weights == (weight_elements(cfg, "encode") + weight_elements(cfg, "decode")) * 4
    assert 10 * GIB < est.total < 40 * GIB   # the configured plan does not fit 8 GiB ...
    assert "activations" in est.describe() and "576x576" in est.describe()


def test_fit_plan_shrinks_tiles_to_the_budget():
    cfg = get_preset("cvvae-v1")
    settings = PlanSettings.from_config(cfg)
    fitted, note = fit_plan(cfg, settings, 17, 720, 1280, 8 * GIB, ("decode",))
    assert fitted.chunk_frames == 16 and fitted.tile_size < 576 and fitted.tile_size % 64 == 0
    assert estimate_memory(cfg, make_plan(fitted, 17, 720, 1280), "decode").total <= 8 * GIB
    bigger = PlanSettings(16, fitted.tile_size + 64, settings.tile_overlap_ratio)
    assert estimate_memory(cfg, make_plan(bigger, 17, 720, 1280), "decode").total > 8 * GIB  # the largest that fits
    assert note.startswith("plan changed to fit the 8.00 GiB memory budget: tile ")
    same, no_note = fit_plan(cfg, settings, 17, 720, 1280, 64 * GIB, ("decode",))
    assert same == settings and no_note == ""


def test_fit_plan_halves_chunks_then_refuses():
    cfg = get_preset("cvvae-v1")
    settings = PlanSettings.from_config(cfg)
    at_min = estimate_memory(cfg, make_plan(PlanSettings(16, MIN_TILE_PX, settings.tile_overlap_ratio), 17, 720,
                                            1280), "decode").total
    fitted, note = fit_plan(cfg, settings, 17, 720, 1280, at_min - 1, ("decode",))
    assert fitted.chunk_frames == 8 and ", chunk 8 frames" in note
    with pytest.raises(PlanError, match=r"a 17x720x1280 video needs about 2.\d\d GiB \(decode: activations .* for a 5x64x64 "
                                         r"tile, .*\) with its smallest plan \(64 px tiles, 4-frame chunks\), more "
                                         r"than the 0.50 GiB budget; raise --max-memory or process a smaller size$"):
        fit_plan(cfg, settings, 17, 720, 1280, GIB // 2, ("decode",))


def test_fit_plan_keeps_the_tiling_and_chunking_the_caller_chose():
    cfg = get_preset("cvvae-v1")
    untiled = PlanSettings(16, None, 0.25)
    need = estimate_memory(cfg, make_plan(untiled, 17, 720, 1280), "decode").total
    # --no-tiling: only the chunks may shrink
    fitted, note = fit_plan(cfg, untiled, 17, 720, 1280, need - 1, ("decode",), fixed_tiles=True)
    assert fitted.tile_size is None and fitted.chunk_frames == 8
    assert note.startswith("plan changed to fit the ") and ": chunk 8 frames (estimated" in note
    # --no-tiling --no-chunking: nothing may change, so the budget refuses with what the user can do
    with pytest.raises(PlanError, match=r"^a 17x720x1280 video needs about \d+\.\d\d GiB .* with its smallest plan "
                                         r"\(no tiling, 16-frame chunks; tiling and chunking as asked\), more than "
                                         r"the \d+\.\d\d GiB budget; raise --max-memory, let the budget choose the "
                                         r"tiling and chunking \(leave out --tile-size/--no-tiling/--chunk-frames/"
                                         r"--no-chunking\) or process a smaller size$"):
        fit_plan(cfg, untiled, 17, 720, 1280, need - 1, ("decode",), fixed_tiles=True, fixed_chunks=True)
    # an explicit tile size is kept too
    tiled = PlanSettings(16, 256, 0.25)
    fitted, _ = fit_plan(cfg, tiled, 17, 720, 1280,
                         estimate_memory(cfg, make_plan(tiled, 17, 720, 1280), "decode").total - 1, ("decode",),
                         fixed_tiles=True)
    assert fitted.tile_size == 256 and fitted.chunk_frames < 16


def test_runtime_budget_honours_no_tiling_and_names_the_real_clip(tiny_v1):
    from cvvae.memory import parse_bytes as size
    vae = VideoVAE(TorchBackend(tiny_v1), PlanSettings(16, None, 0.25), max_memory=size("1M"),
                   fixed=frozenset({"tile_size"}))
    with pytest.raises(PlanError, match=r"^a 5x256x256 video \(planned per chunk of 17 frames\) needs about .* "
                                         r"\(no tiling, 4-frame chunks; tiling as asked\), more than the 0.00 GiB "
                                         r"budget; raise --max-memory, let the budget choose the tiling "):
        vae.plan(5, 256, 256)
    free = VideoVAE(TorchBackend(tiny_v1), PlanSettings(16, None, 0.25), max_memory=size("1M"))
    with pytest.raises(PlanError, match=r"^a 5x256x256 video \(planned per chunk of 17 frames\) needs about .* "
                                         r"\(64 px tiles, 4-frame chunks\), more than the 0.00 GiB budget; raise "
                                         r"--max-memory or process a smaller size$"):
        free.plan(5, 256, 256)


def test_runtime_plans_within_its_budget(tiny_v1):
    vae = VideoVAE(TorchBackend(tiny_v1), max_memory=None)
    assert vae.plan(17, 256, 256).settings == vae.settings
    need = estimate_memory(tiny_v1.config, vae.plan(17, 256, 256), "decode").total
    small = VideoVAE(TorchBackend(tiny_v1), max_memory=need - 1)
    plan = small.plan(17, 256, 256, ("decode",))
    assert plan.settings.tile_size < 256 and plan.num_tiles > 1
    z = torch.randn(1, 4, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    assert small.decode(z).shape == (1, 3, 9, 64, 128)  # a fitted plan still decodes to the original size


@pytest.mark.parametrize("text, expected", [("8G", 8 * GIB), ("1.5g", 3 * GIB // 2), ("512M", 512 << 20),
                                            ("8GiB", 8 * GIB), ("1000", 1000), ("2 GB", 2 * GIB)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "8X", "lots"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="is not a positive size such as 8G, 1.5G or 512M"):
        parse_bytes(text)


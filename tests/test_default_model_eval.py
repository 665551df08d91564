"""scripts/train_default_model.py --only eval: the ship decision of issue 15 and the card's generated section."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("train_default_model", REPO / "scripts" / "train_default_model.py")
tdm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tdm)


def _models(motion_mean, motion_worst, motion_image, ablation_image):
    return {"shipped": {"summary": {"mean_psnr": 22.35, "worst_psnr": 18.74, "image_decoder_psnr": 24.0}},
            "motion": {"summary": {"mean_psnr": motion_mean, "worst_psnr": motion_worst,
                                   "image_decoder_psnr": motion_image}},
            "motion-noreg": {"summary": {"image_decoder_psnr": ablation_image}}}


def test_ship_only_when_better_on_mean_and_worst_and_above_the_ablation():
    assert tdm.ship_decision(_models(24.1, 20.2, 24.5, 24.0))["ship"] is True
    worse = tdm.ship_decision(_models(24.1, 18.0, 24.5, 24.0))
    assert worse["ship"] is False and worse["better"] is False and "worst 18.00 vs 18.74 dB (not better)" in worse["reason"]
    drift = tdm.ship_decision(_models(24.1, 20.2, 23.9, 24.0))
    assert drift["ship"] is False and drift["compatible"] is False and "(not above)" in drift["reason"]
    lone = _models(24.1, 20.2, 24.5, 24.0)
    del lone["motion-noreg"]
    assert tdm.ship_decision(lone) == {"ship": False, "reason": "the motion fine-tune's ablation was not found: "
                                                                "compatibility unproven"}


def test_model_card_section_is_replaced_between_markers(tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# Card\n\nintro\n")
    tdm.update_model_card(card, "## Eval\nfirst\n")
    assert card.read_text() == f"# Card\n\nintro\n\n{tdm.CARD_BEGIN}\n## Eval\nfirst\n{tdm.CARD_END}\n"
    card.write_text(card.read_text() + "\n## Limits\nkept\n")
    tdm.update_model_card(card, "## Eval\nsecond\n")
    text = card.read_text()
    assert "second" in text and "first" not in text and text.endswith("## Limits\nkept\n")
    assert text.count(tdm.CARD_BEGIN) == 1 and text.startswith("# Card\n\nintro\n")


@pytest.mark.parametrize("flag", ["--candidate", "--ablation"])
def test_eval_arguments(flag, tmp_path):
    args = tdm.parse_args(["--only", "eval", flag, str(tmp_path / "x.pt"), "--no-ship"])
    assert getattr(args, flag[2:]) == tmp_path / "x.pt" and args.no_ship and args.only == ["eval"]


def test_shipping_weights_over_the_size_limit_leaves_the_shipped_folder_unchanged(tmp_path, monkeypatch):
    from cvvae.loading import load_model

    shipped = tmp_path / "default"
    (shipped / "onnx").mkdir(parents=True)
    before = {"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"old", "onnx/manifest.json": b"{}"}
    for name, data in before.items():
        (shipped / name).write_bytes(data)
    monkeypatch.setattr(tdm, "WEIGHTS_LIMIT_MB", 0.001)
    with pytest.raises(SystemExit, match=r"over the 0.001 MB limit: .*default left unchanged"):
        tdm.ship_weights(load_model("random:tiny-v1"), shipped)
    assert {str(f.relative_to(shipped)): f.read_bytes() for f in shipped.rglob("*") if f.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]  # no staging folder left behind


def test_card_gives_when_the_figures_were_measured_not_when_they_were_read_from_the_cache():
    r = {"date": "2026-12-01 06:02 UTC", "models": {"shipped": {"measured": "2026-11-30 16:57 UTC"},
                                                    "motion": {"measured": "2026-12-01 05:42 UTC"}}}
    assert tdm._measured(r) == "2026-11-30 16:57 UTC to 2026-12-01 05:42 UTC"
    r["models"] = {"motion": {"measured": "2026-12-01 05:42 UTC"}}
    assert tdm._measured(r) == "2026-12-01 05:42 UTC"
    assert tdm._measured({"date": "2026-12-01 06:02 UTC", "models": {"x": {}}}) == "2026-12-01 06:02 UTC"


def test_shipping_replaces_the_weight_files_and_exports_graphs_of_the_new_weights(tmp_path):
    from cvvae.fsutil import sha256_file
    from cvvae.loading import load_model, save_model

    shipped = save_model(load_model("random:tiny-v1"), tmp_path / "default")
    old_sha = sha256_file(shipped / "diffusion_pytorch_model.safetensors")
    new_model = load_model("random:tiny-v1")
    with torch.no_grad():
        next(iter(new_model.parameters())).add_(0.5)  # other weights, same architecture
    size_mb = tdm.ship_weights(new_model, shipped)
    weights = [shipped / "config.json", shipped / "diffusion_pytorch_model.safetensors"]
    assert size_mb == pytest.approx(sum(f.stat().st_size for f in weights) / 2**20)
    new_sha = sha256_file(shipped / "diffusion_pytorch_model.safetensors")
    manifest = json.loads((shipped / "onnx" / "manifest.json").read_text())
    assert new_sha != old_sha and manifest["checkpoint"]["sha256"] == new_sha
    assert {"encoder.onnx", "decoder.onnx"} <= {p.name for p in (shipped / "onnx").iterdir()}
    reloaded = load_model(shipped)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), new_model.state_dict().values()))

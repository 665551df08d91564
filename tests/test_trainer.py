"""The training loop on tiny configs: checkpoints are atomic, a resumed run continues exactly, configs parse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cvvae.errors import InputError
from cvvae.model import DiagonalGaussian
from cvvae.training.data import DataConfig, TrainSampler, load_sources
from cvvae.training.trainer import (
    CHECKPOINT_NAME,
    CosineSchedule,
    ImageLoss,
    TrainConfig,
    Trainer,
    TrainingError,
    build_task,
    cpu_has_native_bf16,
    read_checkpoint,
    resolve_autocast,
    train,
)

from conftest import REPO, VIDEOS

CONFIGS = REPO / "configs" / "train"


class Crash(Exception):
    """Stands for the process dying (kill -9) between two checkpoints."""


@pytest.fixture(scope="module")
def tiny_config() -> TrainConfig:
    cfg = TrainConfig.from_toml(CONFIGS / "tiny-test.toml")
    # no held-out validation here (tested on its own below); checkpoint every 2 steps
    return cfg.with_overrides(validation={"clips": ()}, budget={"max_steps": 4})


@pytest.fixture(scope="module")
def sources(tiny_config):
    if not list(VIDEOS.glob("*.mp4")):
        pytest.skip(f"training clips not found in {VIDEOS}")
    return load_sources(tiny_config.data)


def make_trainer(config: TrainConfig, run_dir: Path, sources, on_step=None) -> Trainer:
    return Trainer(build_task(config), config, run_dir, TrainSampler(config.data, sources), on_step=on_step)


def losses_of(config, run_dir, sources, *, crash_at: int | None = None) -> dict[int, float]:
    seen: dict[int, float] = {}

    def on_step(step: int, record: dict[str, float]) -> None:
        seen[step] = record["loss"]
        if step == crash_at:
            raise Crash(step)

    trainer = make_trainer(config, run_dir, sources, on_step)
    try:
        trainer.fit()
    except Crash:
        pass
    return seen


def test_tiny_run_writes_checkpoint_weights_and_logs(tiny_config, sources, tmp_path):
    cfg = tiny_config.with_overrides(budget={"max_steps": 3})
    result = train(cfg, tmp_path, sampler=TrainSampler(cfg.data, sources))
    assert result.finished and result.step == 3
    state = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 3 and state["sampler"]["next_step"] == 3
    assert {"model", "loss", "optimizer", "scheduler", "rng", "elapsed_s", "config"} <= set(state)
    assert (tmp_path / "final" / "config.json").exists()
    assert (tmp_path / "final" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp*")), "temporary checkpoint files left behind"
    assert (tmp_path / "config.json").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == [1, 2, 3]  # log_every = 1
    assert all(math.isfinite(r["loss"]) for r in records if r["event"] == "train")
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 3
    # a finished run is not trained again
    again = train(cfg, tmp_path, sampler=TrainSampler(cfg.data, sources))
    assert again.step == 3 and read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3


def test_resume_after_a_crash_continues_exactly(tiny_config, sources, tmp_path):
    reference = losses_of(tiny_config, tmp_path / "straight", sources)
    assert sorted(reference) == [1, 2, 3, 4]

    crashed = losses_of(tiny_config, tmp_path / "crashed", sources, crash_at=3)  # checkpoint of step 2 survives
    assert read_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME)["step"] == 2
    resumed = losses_of(tiny_config, tmp_path / "crashed", sources)
    assert sorted(resumed) == [3, 4], "the resumed run must start at step 3"
    assert [crashed[1], crashed[2]] == [reference[1], reference[2]]
    assert resumed[3] == reference[3] and resumed[4] == reference[4]  # bit-identical on CPU

    a = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["model"]
    b = read_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_config, sources, tmp_path, monkeypatch):
    cfg = tiny_config.with_overrides(budget={"max_steps": 2})
    trainer = make_trainer(cfg, tmp_path, sources)
    trainer.fit()
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    trainer.step = 99
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".lock"]  # no temp files


def test_a_second_process_cannot_train_in_the_same_run_dir(tiny_config, sources, tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "w") as held:  # another live trainer holds the lock
        held.write("12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match="another process \\(pid 12345\\) is training"):
            make_trainer(tiny_config, tmp_path, sources).fit()
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    make_trainer(tiny_config.with_overrides(budget={"max_steps": 1}), tmp_path, sources).fit()  # lock released


def test_resume_refuses_a_checkpoint_of_another_stage(tiny_config, sources, tmp_path):
    cfg = tiny_config.with_overrides(budget={"max_steps": 2})
    make_trainer(cfg, tmp_path, sources).fit()
    state = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    state["config"]["stage"] = "video"
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(Exception, match="stage 'video'"):
        make_trainer(cfg.with_overrides(budget={"max_steps": 4}), tmp_path, sources).fit()


def test_validation_reports_heldout_psnr_and_ssim(tiny_config, sources, tmp_path):
    cfg = TrainConfig.from_toml(CONFIGS / "tiny-test.toml").with_overrides(budget={"max_steps": 1})
    result = train(cfg, tmp_path, sampler=TrainSampler(cfg.data, sources))
    v = result.validation
    assert set(v) == {"carphone_pristine", "mean_psnr", "mean_ssim"}
    assert 5.0 < v["mean_psnr"] < 40.0 and -1.0 <= v["mean_ssim"] <= 1.0


@pytest.mark.parametrize("autocast", ["fp32", "bf16"])
def test_video_stage_trains_an_inflated_model_with_the_latent_loss(sources, tmp_path, autocast):
    """Stage 2 in miniature: a 32-wide image VAE, inflated, two steps of latent-regularised fine-tuning."""
    from cvvae.training.image_vae import ImageVAE, image_preset, save_image_vae
    from cvvae.training.inflate import inflate
    from cvvae.loading import save_model

    torch.manual_seed(0)
    image_vae = ImageVAE(image_preset("tiny-image").replace(ch_mult=(1, 1, 1, 1), num_res_blocks=1, eps=1e-5))
    save_image_vae(image_vae, tmp_path / "image")
    save_model(inflate(image_vae), tmp_path / "inflated")
    data = DataConfig(video_short_sides=(48,), video_max_frames=20, image_short_sides=(64,), image_size=16,
                      image_batch=2, clip_frames=5, clip_size=16, clip_batch=1, schedule="alternate")
    cfg = TrainConfig(name="tiny-video", stage="video", data=data).with_overrides(
        model={"init": str(tmp_path / "inflated")}, loss={"image_vae": str(tmp_path / "image")},
        budget={"max_steps": 2}, validation={"clips": ()}, top={"log_every": 1, "autocast": autocast})
    records = []
    result = train(cfg, tmp_path / "run", sampler=TrainSampler(data, load_sources(data)),
                   on_step=lambda step, r: records.append(r))
    assert result.step == 2 and (tmp_path / "run" / "final" / "config.json").exists()
    assert "psnr_2d" in records[0] and all(math.isfinite(r["loss"]) for r in records)
    state = read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert {"logvar", "logvar_2d"} <= set(state["loss"])  # the learned log-variances are checkpointed
    from cvvae.loading import load_model

    trained = load_model(tmp_path / "run" / "final")  # bf16 autocast trains fp32 weights
    assert trained.dtype == torch.float32 and all(p.dtype == torch.float32 for p in trained.parameters())
    first = trained.decoder.conv_in.weight
    assert not torch.equal(first, load_model(tmp_path / "inflated").decoder.conv_in.weight)  # it did learn


def test_cosine_schedule_values():
    s = CosineSchedule(warmup_steps=4, min_ratio=0.1)
    assert [s.factor(i, 0.0) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(10, 0.0) == 1.0
    assert s.factor(10, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(10, 1.0) == pytest.approx(0.1) and s.factor(10, 2.0) == pytest.approx(0.1)


def test_image_loss_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    xrec = torch.full_like(x, 0.5)
    posterior = DiagonalGaussian(torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1))  # KL = 0.5 * 4 * 1 = 2
    loss, logs = ImageLoss(kl_weight=0.48, edge_weight=1.0)(x, xrec, posterior)
    assert logs["l1"] == pytest.approx(0.5) and logs["kl"] == pytest.approx(2.0) and logs["edge"] == 0.0
    assert loss.item() == pytest.approx(0.5 + 0.48 * 2.0 / 48)


def test_shipped_configs_parse_and_unknown_keys_fail():
    for path in sorted(CONFIGS.glob("*.toml")):
        cfg = TrainConfig.from_toml(path)
        assert cfg.threads == 1 and cfg.stage in ("image", "video", "video-noreg"), path
    assert TrainConfig.from_toml(CONFIGS / "default-video-noreg.toml").loss.rec2d_weight == 0.0
    with pytest.raises(InputError, match="unknown \\[optim\\] keys \\['learning_rate'\\]"):
        TrainConfig.from_dict({"stage": "image", "optim": {"learning_rate": 1.0}})
    with pytest.raises(InputError, match="stage="):
        TrainConfig.from_dict({"stage": "images"})
    with pytest.raises(InputError, match="autocast='fp16'; expected one of auto, fp32, bf16"):
        TrainConfig.from_dict({"stage": "video", "autocast": "fp16"})
    motion = TrainConfig.from_toml(CONFIGS / "default-video-motion.toml")
    ablation = TrainConfig.from_toml(CONFIGS / "default-video-motion-noreg.toml")
    assert motion.autocast == "auto" and motion.data.max_stride == 8 and motion.data.motion_fraction == 0.5
    assert ablation.stage == "video-noreg" and ablation.loss.rec2d_weight == 0.0
    same = {k: v for k, v in motion.as_dict().items() if k not in ("name", "stage", "loss")}
    assert same == {k: v for k, v in ablation.as_dict().items() if k not in ("name", "stage", "loss")}


def test_autocast_auto_uses_bf16_only_with_native_cpu_support(tmp_path, monkeypatch):
    import cvvae.training.trainer as trainer_module

    epyc = tmp_path / "epyc"
    epyc.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    xeon = tmp_path / "xeon"
    xeon.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_native_bf16(epyc) and cpu_has_native_bf16(xeon)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_autocast("auto") == expected
        assert resolve_autocast("fp32") == "fp32" and resolve_autocast("bf16") == "bf16"

"""Benchmark machinery: FLOP counting (hand-computed, and the plan sum against the executor's own calls) and a tiny
end-to-end bench through the Python API (table rows, ratio column, positive GFLOP/s, memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvvae import tiling
from cvvae.config import preset
from cvvae.errors import InputError
from cvvae.plan import PlanSettings, make_plan
from cvvae.tools.bench import BenchConfig, Target, load_result, run_bench, write_results
from cvvae.tools.flops import FlopCounter, module_flops, tile_calls


@pytest.mark.parametrize("cin,cout,t,h,w,padding", [(4, 8, 5, 6, 7, 1), (3, 16, 9, 8, 8, 1), (8, 8, 3, 5, 5, 0)])
def test_conv3d_flops_match_hand_count(cin, cout, t, h, w, padding):
    with torch.device("meta"):
        conv = nn.Conv3d(cin, cout, 3, padding=padding)
    to, ho, wo = (n - 2 * (1 - padding) for n in (t, h, w))  # output size of a 3x3x3 conv
    # one multiply-add (2 FLOPs) per weight per output position: 2 * Cin * Cout * 27 * T' * H' * W' (bias not counted)
    assert module_flops(conv, (1, cin, t, h, w)) == 2 * cin * cout * 27 * to * ho * wo
    assert module_flops(conv, (2, cin, t, h, w)) == 2 * 2 * cin * cout * 27 * to * ho * wo


def test_tile_calls_follow_the_plan():
    # tiny-v1 plan: 64 px tiles, overlap 0.25 -> latent tile 8, overlap 2, stride 6; 33 frames -> 2 encode chunks
    # 80 x 120 px = 10 x 15 latent cells -> rows start 0, 6 (sizes 8, 4), cols start 0, 6, 12 (sizes 8, 8, 3)
    plan = make_plan(PlanSettings(chunk_frames=16, tile_size=64, tile_overlap_ratio=0.25), 33, 80, 120)
    assert plan.rows.sizes == (8, 4) and plan.cols.sizes == (8, 8, 3)
    calls = tile_calls(plan, "encoder", channels=3)
    assert len(calls) == 2 * 2 * 3
    assert calls[0] == (1, 3, 17, 64, 64) and calls[5] == (1, 3, 17, 32, 24)
    dec = tile_calls(plan, "decoder", channels=4)
    assert [c[2] for c in dec[::6]] == [5, 5] and dec[-1] == (1, 4, 5, 4, 3)


@pytest.mark.parametrize("component", ["encoder", "decoder"])
def test_plan_flops_equal_the_executor_sum_over_tiles(component):
    """The plan's total equals (a) the sum of per-tile counts and (b) what FlopCounterMode sees when the real
    executor (cvvae.tiling: padding, chunks, tiles, blending) runs the meta model over the whole video."""
    cfg = preset("tiny-v1")
    counter = FlopCounter(cfg)
    plan = make_plan(PlanSettings.from_config(cfg), 33, 80, 120)  # 2 chunks x (2 x 3) tiles of 4 shapes
    result = counter.plan(plan, component)
    channels = counter.channels(component)
    assert result.calls == len(tile_calls(plan, component, channels=channels)) == 12
    assert result.total == sum(counter.component(component, s) for s in tile_calls(plan, component, channels=channels))
    module = counter.module(component)
    with torch.enable_grad(), FlopCounterMode(display=False) as seen:  # the forward as written (tools.flops)
        if component == "encoder":
            tiling.encode_video(module, torch.empty(1, 3, 33, 80, 120, device="meta"), plan)
        else:
            tiling.decode_video(module, torch.empty(1, 4, 9, 10, 15, device="meta"), plan)
    assert seen.get_total_flops() == result.total > 0


def test_config_checks_come_first():
    with pytest.raises(InputError, match="unknown op"):
        BenchConfig(ops=("encode", "train"))
    with pytest.raises(InputError, match="reference runs in fp32"):
        Target.parse("reference:fp16")
    with pytest.raises(InputError, match="unknown bench target"):
        BenchConfig(targets=("tensorflow",))
    assert [t.label for t in BenchConfig(targets=("onnxruntime:fp16",)).parsed_targets()] == \
        ["reference", "onnxruntime fp16"]


def test_cli_rejects_bad_frames_before_loading_anything():
    from cvvae.tools.bench_cli import bench

    result = CliRunner().invoke(bench, ["--frames", "17,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


@pytest.fixture(scope="module")
def tiny_export(shared_exports):
    """An export of random:tiny-v1 (no verification: test_export covers that); the bench takes export dirs."""
    return shared_exports.get("tiny-v1", ("fp32", "fp16"))


def test_tiny_bench_reports_ratios_gflops_and_memory(tmp_path, tiny_export):
    cfg = BenchConfig(models=(str(tiny_export),),
                      targets=("torch:fp32", "torch:bf16", "onnxruntime:fp32", "onnxruntime:int8"),
                      frames=(5, 9), frame_size=(16, 16), sizes=((16, 16), (8, 16)), size_frames=5, reps=1,
                      warmup=0, threads=1, gemm_size=256, gemm_seconds=0.1)
    messages: list[str] = []
    result = run_bench(cfg, on_progress=messages.append)
    counted = [m for m in messages if m.startswith("[")]
    assert [m.split(" measured")[0] for m in counted] == [f"[{i}/9" for i in range(9)]  # 3 shapes x 3 ops
    assert "ETA" not in counted[0] and "ETA ~" in counted[1]
    shapes = ["5x16x16", "9x16x16", "5x8x16"]
    labels = ["reference", "torch fp32", "torch bf16", "onnxruntime fp32"]
    assert [(r.shape, r.op, r.target) for r in result.rows] == [
        (s, op, t) for s in shapes for op in ("encode", "decode", "roundtrip") for t in labels]
    for r in result.rows:
        assert r.gflop > 0 and r.gflop_s > 0 and 0 < r.fraction_of_gemm_peak and r.fps > 0
        assert len(r.times_s) == 1 and r.time_vs_reference > 0
        if r.target == "reference":
            assert r.time_vs_reference == 1.0
        if Path("/proc/self/clear_refs").exists():
            assert r.peak_mem_mb > 0 and r.mem_delta_mb >= 0
    enc = {r.shape: r.gflop for r in result.rows if r.op == "encode" and r.target == "reference"}
    rt = {r.shape: r.gflop for r in result.rows if r.op == "roundtrip" and r.target == "reference"}
    assert enc["9x16x16"] > enc["5x16x16"] and all(rt[s] > enc[s] for s in shapes)
    assert [s["target"] for s in result.skipped] == ["onnxruntime int8"]
    assert "no int8 graphs" in result.skipped[0]["reason"]
    assert {g.engine for g in result.gemm} >= {"torch"} and result.peak_gflop_s > 0

    table = result.markdown()
    assert "| time / ref |" in table and "GEMM peak" in table and "Not measured" in table
    body = [line for line in table.splitlines() if line.startswith(f"| {tiny_export} |")]
    assert len(body) == 3 * 3 * 4
    assert all(line.split("|")[13].strip() == "1.00" for line in body if "| reference |" in line)

    pytest.importorskip("matplotlib")
    out = write_results(result, tmp_path / "bench")
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", ".cvvae-output.json"} | {
        f"{str(tiny_export).replace('/', '-').strip('-')}-{op}.png" for op in ("encode", "decode", "roundtrip")}
    assert json.loads((out / "bench.json").read_text())["format"] == "cvvae-bench/1"
    assert load_result(out / "bench.json").markdown() == table

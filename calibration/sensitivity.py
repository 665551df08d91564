"""Sensitivity search: which layer groups must stay float for the INT8 round trip to meet a PSNR target.

1. **Groups.** A group is the module a quantizable node belongs to one level up: the residual block, attention block,
   up/downsampler or stem that holds the Conv/MatMul (``decoder.up.1.block.0``, ``decoder.up.1.upsample``,
   ``decoder.mid.attn_1``, ``encoder.conv_in``); see :func:`layer_group`.
2. **Cost of a group.** Only that group is quantized (the other component stays fp32) and the round trip runs on the
   held-out chunks; the cost is the mean squared error against the cached fp32 round trip.
3. **Exclusion.** The target is a drop of the round trip's PSNR against the input frames, relative to fp32:
   ``drop = PSNR(fp32 round trip, input) - PSNR(int8 round trip, input)``. Errors of independent groups roughly add,
   so after excluding the k worst groups the drop is predicted as
   ``10 log10((M0 + a * sum of the remaining costs) / M0)`` (M0: the fp32 MSE against the input; ``a`` fitted to
   the measured all-INT8 model). The search starts at the smallest k predicted to meet the target, measures, and
   moves k up while the measured drop misses the target and down while one fewer exclusion still meets it.

All runs are ONNX Runtime CPU sessions on the graph files; the fp32 latents and round trips are computed once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from cvvae.calibration.quantize import GraphQuantizer, module_path
from cvvae.metrics import psnr_from_mse
from cvvae.onnxrt import ort_session

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def layer_group(node: onnx.NodeProto, weights: set[str]) -> str:
    """The group of a quantizable node: the parent of its leaf module for a weighted Conv/MatMul
    (``decoder.up.1.block.0.conv1`` -> ``decoder.up.1.block.0``; a top-level ``decoder.conv_in`` is its own group),
    the calling module for an activation x activation MatMul (``decoder.mid.attn_1``)."""
    path = module_path(node, weights)
    if any(i in weights for i in node.input[1:2]):
        parts = path.split(".")
        return ".".join(parts[:-1]) if len(parts) > 2 else path
    return path


def layer_groups(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Group name -> node names (graph order) for the given quantizable nodes."""
    weights = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    groups: dict[str, list[str]] = {}
    for name in nodes:
        groups.setdefault(layer_group(by_name[name], weights), []).append(name)
    return groups


@dataclass(frozen=True)
class Score:
    """Round trip of the held-out chunks with some graphs quantized."""

    mse_vs_input: float
    mse_vs_fp32: float
    psnr_vs_input: float
    psnr_vs_fp32: float
    drop_db: float           # PSNR(fp32, input) - PSNR(this, input)

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isinf(v) else float(f"{v:.6g}")) for k, v in asdict(self).items()}


def _session(path: Path, threads: int | None):
    return ort_session(path, threads=threads)


def encode_means(encoder: Path, videos: Sequence[np.ndarray], *, threads: int | None = None) -> list[np.ndarray]:
    """Latent means of ``videos`` (each 1x3xTxHxW float32) from an encoder graph."""
    session = _session(Path(encoder), threads)
    return [session.run(["mean"], {"video": np.ascontiguousarray(v, dtype=np.float32)})[0] for v in videos]


class RoundTrip:
    """Runs encoder -> decoder on held-out chunks in ONNX Runtime and scores against the cached fp32 results."""

    def __init__(self, encoder_fp32: Path, decoder_fp32: Path, videos: Sequence[np.ndarray], *,
                 threads: int | None = None) -> None:
        self.threads = threads
        self.encoder_fp32 = Path(encoder_fp32)
        self.decoder_fp32 = Path(decoder_fp32)
        self.videos = [np.ascontiguousarray(v, dtype=np.float32) for v in videos]
        self.latents = encode_means(self.encoder_fp32, self.videos, threads=threads)
        dec = self._session(self.decoder_fp32)
        self._decoder = dec
        self.reference = [dec.run(None, {"latent": z})[0] for z in self.latents]
        self.fp32_mse = self._mse(self.reference, self.videos)
        self.fp32_psnr = psnr_from_mse(self.fp32_mse)

    def _session(self, path: Path):
        return _session(path, self.threads)

    @staticmethod
    def _mse(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
        return float(np.mean([np.mean((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b)]))

    def score(self, outputs: Sequence[np.ndarray]) -> Score:
        mse_in, mse_ref = self._mse(outputs, self.videos), self._mse(outputs, self.reference)
        psnr_in = psnr_from_mse(mse_in)
        return Score(mse_in, mse_ref, psnr_in, psnr_from_mse(mse_ref), self.fp32_psnr - psnr_in)

    def run(self, encoder: Path | None = None, decoder: Path | None = None) -> tuple[Score, list[np.ndarray]]:
        """Round trip with the given graphs (None: the fp32 one, with its cached outputs)."""
        latents = self.latents
        if encoder is not None:
            enc = self._session(encoder)
            latents = [enc.run(["mean"], {"video": v})[0] for v in self.videos]
        if encoder is None and decoder is None:
            outputs = self.reference
        else:
            dec = self._session(decoder) if decoder is not None else self._decoder
            outputs = [dec.run(None, {"latent": z})[0] for z in latents]
        return self.score(outputs), outputs


@dataclass
class GroupCost:
    component: str
    group: str
    nodes: list[str]
    mse_vs_fp32: float
    psnr_vs_fp32: float
    drop_db: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["psnr_vs_fp32"] = None if math.isinf(self.psnr_vs_fp32) else round(self.psnr_vs_fp32, 3)
        d["drop_db"] = round(self.drop_db, 4)
        return d


@dataclass
class SearchStep:
    excluded: int                 # how many of the ranked groups are float
    predicted_drop_db: float | None
    score: Score

    def as_dict(self) -> dict[str, Any]:
        return {"excluded_groups": self.excluded,
                "predicted_drop_db": None if self.predicted_drop_db is None else round(self.predicted_drop_db, 4),
                **self.score.as_dict()}


@dataclass
class SensitivityResult:
    target_drop_db: float | None
    holdout_chunks: int
    fp32_psnr_vs_input: float
    all_int8: Score
    ranking: list[GroupCost]             # worst first
    steps: list[SearchStep]
    excluded_groups: list[str]           # "component:group", the float ones chosen by the search
    final: Score
    seconds: float = 0.0
    note: str = ""

    def excluded_nodes(self, component: str) -> dict[str, str]:
        out = {}
        for cost in self.ranking:
            key = f"{cost.component}:{cost.group}"
            if cost.component == component and key in self.excluded_groups:
                rank = self.ranking.index(cost) + 1
                out.update({n: f"sensitivity (group {cost.group}, rank {rank})" for n in cost.nodes})
        return out

    def as_dict(self, component: str | None = None) -> dict[str, Any]:
        ranking = [c for c in self.ranking if component is None or c.component == component]
        return {
            "target_drop_db": self.target_drop_db,
            "metric": "drop of the round trip's PSNR against the input frames, int8 vs fp32, held-out chunks",
            "holdout_chunks": self.holdout_chunks,
            "fp32_psnr_vs_input": round(self.fp32_psnr_vs_input, 4),
            "all_int8": self.all_int8.as_dict(),
            "final": self.final.as_dict(),
            "excluded_groups": [g for g in self.excluded_groups if component is None or g.startswith(component + ":")],
            "ranking": [{**c.as_dict(), "rank": self.ranking.index(c) + 1,
                         "decision": "float" if f"{c.component}:{c.group}" in self.excluded_groups else "int8"}
                        for c in ranking],
            "steps": [s.as_dict() for s in self.steps],
            "seconds": round(self.seconds, 2),
            "note": self.note,
        }


def search(quantizers: Mapping[str, GraphQuantizer], trip: RoundTrip, workdir: Path, *,
           target_drop_db: float | None, rank: bool = True, say: Say | None = None) -> SensitivityResult:
    """Rank the layer groups and exclude the worst until the round trip meets ``target_drop_db`` (None: measure only).

    ``quantizers`` maps "encoder"/"decoder" to calibrated :class:`GraphQuantizer`; a missing component stays fp32.
    """
    say = say or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def trial(exclude: Mapping[str, set[str]] | None = None, only: tuple[str, list[str]] | None = None) -> Score:
        paths: dict[str, Path | None] = {"encoder": None, "decoder": None}
        for component, q in quantizers.items():
            if only is not None and only[0] != component:
                continue
            path = workdir / f"{component}.trial.onnx"
            q.quantize(path, exclude=(exclude or {}).get(component, set()),
                       only=only[1] if only is not None else None)
            paths[component] = path
        return trip.run(paths["encoder"], paths["decoder"])[0]

    all_int8 = trial()
    say(f"all-INT8 round trip on {len(trip.videos)} held-out chunks: {all_int8.psnr_vs_input:.2f} dB vs input "
        f"(fp32 {trip.fp32_psnr:.2f} dB, drop {all_int8.drop_db:.3f} dB), {all_int8.psnr_vs_fp32:.2f} dB vs fp32")
    ranking: list[GroupCost] = []
    if rank:
        for component, q in quantizers.items():
            groups = layer_groups(q.model, q.candidates)
            say(f"{component}: measuring {len(groups)} layer groups one at a time")
            for group, nodes in groups.items():
                s = trial(only=(component, nodes))
                ranking.append(GroupCost(component, group, nodes, s.mse_vs_fp32, s.psnr_vs_fp32, s.drop_db))
                log.debug("%s %s: %.2f dB vs fp32", component, group, s.psnr_vs_fp32)
        ranking.sort(key=lambda c: c.mse_vs_fp32, reverse=True)

    steps = [SearchStep(0, None, all_int8)]
    chosen, final, note = 0, all_int8, ""
    if target_drop_db is not None and all_int8.drop_db > target_drop_db and ranking:
        costs = [c.mse_vs_fp32 for c in ranking]
        total = sum(costs)
        m0 = trip.fp32_mse
        scale = (all_int8.mse_vs_input - m0) / total if total > 0 else 1.0
        scale = scale if scale > 0 else 1.0

        def predicted(k: int) -> float:
            return 10 * math.log10((m0 + scale * sum(costs[k:])) / m0) if m0 > 0 else 0.0

        def exclusions(k: int) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for c in ranking[:k]:
                out.setdefault(c.component, set()).update(c.nodes)
            return out

        measured: dict[int, Score] = {0: all_int8}

        def measure(k: int) -> Score:
            if k not in measured:
                measured[k] = trial(exclude=exclusions(k))
                steps.append(SearchStep(k, predicted(k), measured[k]))
                say(f"  {k} group(s) float: drop {measured[k].drop_db:.3f} dB (predicted {predicted(k):.3f})")
            return measured[k]

        k = next((k for k in range(len(ranking) + 1) if predicted(k) <= target_drop_db), len(ranking))
        while measure(k).drop_db > target_drop_db and k < len(ranking):
            k += 1
        while k > 0 and measure(k - 1).drop_db <= target_drop_db:
            k -= 1
        chosen, final = k, measure(k)
        if final.drop_db > target_drop_db:
            note = "target not met even with every ranked group float (the configured exclusions remain)"
    elif target_drop_db is not None and all_int8.drop_db <= target_drop_db:
        note = "the all-INT8 graphs meet the target; no group excluded"
    excluded = [f"{c.component}:{c.group}" for c in ranking[:chosen]]
    if excluded:
        say(f"kept float: {', '.join(excluded)} -> drop {final.drop_db:.3f} dB (target {target_drop_db} dB)")
    return SensitivityResult(target_drop_db, len(trip.videos), trip.fp32_psnr, all_int8, ranking, steps, excluded,
                             final, time.perf_counter() - started, note)

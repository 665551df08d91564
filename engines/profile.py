"""Optimization profiles as data: what shapes an engine accepts, and which profile runs a given chunk or tile.

Two levels, both plain data until the very end (``Profile.to_trt``):

* A **profile spec** (TOML, :class:`ProfileSpec`) speaks the graphs' dynamic axis names, as the export manifest
  lists them: ``batch``, ``frames``, ``height``, ``width`` (pixels) for the encoder input and ``batch``,
  ``latent_frames``, ``latent_height``, ``latent_width`` (latent cells) for the decoder input. Each axis is
  ``[min, opt, max]`` (or one int for a static axis). A component may list several profiles (``[[encoder.profiles]]``).
* A :class:`Profile` is an ordered mapping input name -> :class:`ShapeTuple` (full shapes, channels included), as
  Polygraphy's ``Profile``. :func:`resolve_profiles` turns a spec into profiles through the manifest's input dims.

Defaults (:func:`default_spec`) follow the plan: the encoder sees one temporal chunk (``chunk_frames + 1`` frames) of
one tile (``tile_size`` px), the decoder ``chunk_frames / time_compress + 1`` latents of ``tile_size / 8`` cells.
The runtime picks, per call, the smallest profile that contains the shape (:func:`choose_profile`); a shape outside
every profile raises :class:`ShapeOutsideProfileError` with the profile entry to add.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from cvvae.errors import ProfileError, ShapeOutsideProfileError

Shape = tuple[int, ...]


# ----- one input: (min, opt, max) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeTuple:
    """min, opt and max shape of one input (same rank; min <= opt <= max on every axis; all positive)."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ProfileError(f"min {self.min}, opt {self.opt} and max {self.max} must have the same rank")
        if any(v < 1 for v in self.min):
            raise ProfileError(f"min shape {self.min} must be positive on every axis")
        bad = [i for i, (a, b, c) in enumerate(zip(self.min, self.opt, self.max)) if not a <= b <= c]
        if bad:
            raise ProfileError(f"axes {bad} violate min <= opt <= max: min {self.min}, opt {self.opt}, max {self.max}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(a <= s <= b for a, s, b in zip(self.min, shape, self.max))

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[int]]) -> "ShapeTuple":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


# ----- one profile: input name -> ShapeTuple -----------------------------------------------------------------------
class Profile(Mapping[str, ShapeTuple]):
    """An ordered mapping from input name to :class:`ShapeTuple`; ``name`` labels it in logs and errors."""

    def __init__(self, name: str = "profile", shapes: Mapping[str, ShapeTuple] | None = None) -> None:
        self.name = name
        self._shapes: dict[str, ShapeTuple] = dict(shapes or {})

    def add(self, input_name: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> "Profile":
        """Add (or replace) one input; returns self so calls chain."""
        self._shapes[input_name] = ShapeTuple(tuple(min), tuple(opt), tuple(max))
        return self

    def __getitem__(self, key: str) -> ShapeTuple:
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and (self.name, self._shapes) == (other.name, other._shapes)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {_dims(v.min)}..{_dims(v.opt)}..{_dims(v.max)}" for k, v in self.items())
        return f"Profile({self.name!r}, {{{inner}}})"

    def check_inputs(self, input_names: Sequence[str], *, what: str = "the graph") -> None:
        """Every profile input must be a graph input and every graph input must be in the profile."""
        unknown = [n for n in self if n not in input_names]
        if unknown:
            raise ProfileError(
                f"profile {self.name!r} names input(s) {', '.join(map(repr, unknown))} that {what} does not have; "
                f"its inputs are: {', '.join(input_names)}"
            )
        missing = [n for n in input_names if n not in self]
        if missing:
            raise ProfileError(f"profile {self.name!r} gives no shapes for input(s) {', '.join(missing)} of {what}")

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return all(name in self and self[name].contains(shape) for name, shape in shapes.items())

    def max_volume(self) -> int:
        """Elements of all inputs at their max shapes: what "smallest profile" means."""
        return sum(math.prod(st.max) for st in self.values())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: v.as_dict() for k, v in self.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(d.get("name", "profile"), {k: ShapeTuple.from_dict(v) for k, v in d["shapes"].items()})

    def to_trt(self, builder: Any, network: Any) -> Any:
        """The ``IOptimizationProfile`` for ``network`` (TensorRT objects only here, at the very end)."""
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        self.check_inputs(inputs, what="the parsed network")
        trt_profile = builder.create_optimization_profile()
        for name, st in self.items():
            trt_profile.set_shape(name, st.min, st.opt, st.max)
        return trt_profile


# ----- the spec: axis ranges per component, read from TOML ------------------------------------------------------------
Range = tuple[int, int, int]


@dataclass(frozen=True)
class AxisProfile:
    """One profile of a component in axis terms: axis name -> (min, opt, max)."""

    name: str
    axes: dict[str, Range] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis, r in self.axes.items():
            if len(r) != 3:
                raise ProfileError(f"profile {self.name!r}: axis {axis!r} needs [min, opt, max], got {list(r)}")
            lo, opt, hi = r
            if not 1 <= lo <= opt <= hi:
                raise ProfileError(f"profile {self.name!r}: axis {axis!r} = {list(r)} must satisfy "
                                   "1 <= min <= opt <= max")


@dataclass(frozen=True)
class ProfileSpec:
    """Profiles per component (``{"encoder": [AxisProfile, ...], "decoder": [...]}``)."""

    components: dict[str, tuple[AxisProfile, ...]]

    def __post_init__(self) -> None:
        for component, profiles in self.components.items():
            if not profiles:
                raise ProfileError(f"component {component!r} lists no profiles")
            names = [p.name for p in profiles]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ProfileError(f"{component}: profile name(s) {', '.join(dupes)} used twice")

    def for_component(self, component: str) -> tuple[AxisProfile, ...]:
        if component not in self.components:
            raise ProfileError(f"the profile spec has no [{component}] section; it has "
                               f"{', '.join(self.components) or 'none'}")
        return self.components[component]

    # ----- TOML ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "profile spec") -> "ProfileSpec":
        """``{component: {<axis> = default range..., profiles = [{name, <axis> = range...}]}}``."""
        components: dict[str, tuple[AxisProfile, ...]] = {}
        for component, section in data.items():
            if not isinstance(section, Mapping):
                raise ProfileError(f"{source}: [{component}] must be a table, got {type(section).__name__}")
            defaults = {k: _range(v, f"{source}: {component}.{k}") for k, v in section.items() if k != "profiles"}
            entries = section.get("profiles", [{}])
            if not isinstance(entries, list):
                raise ProfileError(f"{source}: {component}.profiles must be an array of tables "
                                   f"([[{component}.profiles]])")
            profiles = []
            for k, entry in enumerate(entries):
                name = str(entry.get("name", f"profile{k}"))
                axes = dict(defaults)
                axes.update({a: _range(v, f"{source}: {component}.profiles[{name}].{a}")
                             for a, v in entry.items() if a != "name"})
                profiles.append(AxisProfile(name, axes))
            components[component] = tuple(profiles)
        return cls(components)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ProfileSpec":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"profile file {path} does not exist (example: configs/profiles/default.toml)") from None
        except tomllib.TOMLDecodeError as e:
            raise ProfileError(f"{path} is not valid TOML: {e}") from e
        return cls.from_dict(data, source=str(path))

    def to_toml(self) -> str:
        """TOML that :meth:`from_toml` reads back to an equal spec (every axis written out per profile)."""
        lines: list[str] = []
        for component, profiles in self.components.items():
            for p in profiles:
                lines += [f"[[{component}.profiles]]", f'name = "{p.name}"']
                lines += [f"{axis} = [{r[0]}, {r[1]}, {r[2]}]" for axis, r in p.axes.items()]
                lines.append("")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {c: [{"name": p.name, **{a: list(r) for a, r in p.axes.items()}} for p in ps]
                for c, ps in self.components.items()}


def _range(value: Any, where: str) -> Range:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        return (value[0], value[1], value[2])
    raise ProfileError(f"{where} must be [min, opt, max] integers or one integer (static), got {value!r}")


# ----- defaults from the manifest and plan ----------------------------------------------------------------------------
def default_spec(manifest: Any, *, batch: Range = (1, 1, 1), image_profile: bool = False,
                 components: Sequence[str] | None = None) -> ProfileSpec:
    """Profiles that fit the plan of an export (``manifest``: :class:`cvvae.export.manifest.ExportManifest`).

    Encoder: frames 1..chunk_frames+1 (opt the full chunk), height/width ``spatial_compress``..tile px (opt the
    tile). Decoder: latent_frames 1..chunk_frames/time_compress+1, latent height/width 1..tile/spatial_compress cells.
    With no chunking or tiling in the plan, the model config's chunk and tile sizes bound the profile instead (the
    released 16 frames / 576 px when the config has none either).
    ``image_profile`` adds a single-frame profile (T = 1 / one latent) to each component.
    """
    cfg = manifest.model_config()
    plan = manifest.plan_settings()
    release = type(cfg)()  # a config with null chunk/tile (official "none") falls back to the released 16 / 576
    chunk = plan.chunk_frames or cfg.chunk_frames or release.chunk_frames
    tile = plan.tile_size or cfg.tile_spatial_size or release.tile_spatial_size
    s = plan.spatial_compress
    tile = max(s, tile // s * s)
    frames, cells = chunk + 1, tile // s
    latents = plan.num_latent_frames(frames)  # a full chunk and the frame it shares: chunk/4 + 1 latents
    spec: dict[str, tuple[AxisProfile, ...]] = {
        "encoder": (AxisProfile("chunk", {"batch": batch, "frames": (1, frames, frames), "height": (s, tile, tile),
                                          "width": (s, tile, tile)}),),
        "decoder": (AxisProfile("chunk", {"batch": batch, "latent_frames": (1, latents, latents),
                                          "latent_height": (1, cells, cells), "latent_width": (1, cells, cells)}),),
    }
    if image_profile:
        spec["encoder"] += (AxisProfile("image", {**spec["encoder"][0].axes, "frames": (1, 1, 1)}),)
        spec["decoder"] += (AxisProfile("image", {**spec["decoder"][0].axes, "latent_frames": (1, 1, 1)}),)
    wanted = components if components is not None else list(manifest.components)
    return ProfileSpec({c: spec[c] for c in wanted})


def resolve_profiles(axis_profiles: Sequence[AxisProfile], inputs: Sequence[Any], *, component: str) -> list[Profile]:
    """Full-shape profiles for a component whose inputs are ``inputs`` (manifest ``TensorEntry``: name, dims).

    Dims that are ints (channels) are static; string dims take the profile's range for that axis name. Axis names the
    graph does not have are rejected with the list of those it has, and so are missing ones.
    """
    graph_axes = [d for t in inputs for d in t.dims if isinstance(d, str)]
    result = []
    for ap in axis_profiles:
        unknown = [a for a in ap.axes if a not in graph_axes]
        if unknown:
            raise ProfileError(f"{component} profile {ap.name!r}: unknown axis {', '.join(map(repr, unknown))}; "
                               f"the {component} graph's dynamic axes are: {', '.join(dict.fromkeys(graph_axes))}")
        missing = [a for a in dict.fromkeys(graph_axes) if a not in ap.axes]
        if missing:
            raise ProfileError(f"{component} profile {ap.name!r} gives no range for axis "
                               f"{', '.join(map(repr, missing))}")
        profile = Profile(ap.name)
        for t in inputs:
            lo, opt, hi = ([d if isinstance(d, int) else ap.axes[d][k] for d in t.dims] for k in range(3))
            profile.add(t.name, lo, opt, hi)
        profile.check_inputs([t.name for t in inputs], what=f"the {component} graph")
        result.append(profile)
    return result


# ----- choosing a profile at run time --------------------------------------------------------------------------------
def choose_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], *, engine: str = "engine",
                   axis_names: Mapping[str, Sequence[str | int | None]] | None = None) -> int:
    """Index of the smallest profile (by max volume; the first on a tie) containing every input shape.

    Raises :class:`ShapeOutsideProfileError` naming the input, its shape, every profile's ranges and the profile entry
    that would cover it. ``axis_names`` (input name -> dims, as in the manifest) lets the suggested entry use the spec's
    axis names; ``engine`` is the engine file name (``encoder.fp16.plan``), whose first part names the component.
    """
    fits = [i for i, p in enumerate(profiles) if p.contains(shapes)]
    if fits:
        return min(fits, key=lambda i: (profiles[i].max_volume(), i))
    raise ShapeOutsideProfileError(outside_message(profiles, shapes, engine=engine, axis_names=axis_names))


def outside_message(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], *, engine: str,
                    axis_names: Mapping[str, Sequence[str | int | None]] | None = None) -> str:
    """The text of :class:`ShapeOutsideProfileError` (see :func:`choose_profile`)."""
    outside = [n for n, s in shapes.items() if not any(n in p and p[n].contains(s) for p in profiles)]
    name = outside[0] if outside else next(iter(shapes))
    shape = tuple(shapes[name])
    lines = [f"{engine}: input {name!r} of shape {_dims(shape)} is outside every optimization profile:"]
    for i, p in enumerate(profiles):
        if name not in p:
            lines.append(f"  profile {i} {p.name!r}: has no input {name!r} (inputs: {', '.join(p)})")
            continue
        st = p[name]
        if len(st.min) != len(shape):
            why = [f"rank {len(shape)}, the profile has rank {len(st.min)}"]
        else:
            why = [f"axis {k} = {v} not in [{lo}, {hi}]"
                   for k, (lo, v, hi) in enumerate(zip(st.min, shape, st.max)) if not lo <= v <= hi]
        lines.append(f"  profile {i} {p.name!r}: min {_dims(st.min)}, opt {_dims(st.opt)}, max {_dims(st.max)}"
                     + (f" ({'; '.join(why)})" if why else " (this input fits; another input does not)"))
    base = next((p[name] for p in profiles if name in p and len(p[name].min) == len(shape)), None)
    lo = [min(a, v) for a, v in zip(base.min, shape)] if base else list(shape)
    hi = [max(b, v) for b, v in zip(base.max, shape)] if base else list(shape)
    dims = list((axis_names or {}).get(name, ()))
    if len(dims) == len(shape) and any(isinstance(d, str) for d in dims):
        component = Path(engine).name.split(".")[0]
        entry = [f"[[{component}.profiles]]", 'name = "custom"']
        entry += [f"{d} = [{lo[k]}, {shape[k]}, {hi[k]}]" for k, d in enumerate(dims) if isinstance(d, str)]
        lines.append("Add a profile that covers it to the profiles TOML and rebuild "
                     "(cvvae build-engines --profiles FILE --rebuild), e.g.\n    " + "\n    ".join(entry))
    else:
        lines.append(f"Add a profile with {name}: min {_dims(lo)}, opt {_dims(shape)}, max {_dims(hi)} and rebuild "
                     "the engine (cvvae build-engines --profiles FILE --rebuild).")
    lines.append("Or make the runtime's chunks and tiles fit the engine (--tile-size, --chunk-frames; batch > 1 comes "
                 "from --batch-tiles).")
    return "\n".join(lines)


# ----- plan coverage (a check at build time) --------------------------------------------------------------------------
def largest_call_shapes(manifest: Any, *, batch: int = 1) -> dict[str, dict[str, Shape]]:
    """The largest input each component receives from the runtime under the export's plan (None when unbounded)."""
    cfg = manifest.model_config()
    plan = manifest.plan_settings()
    out: dict[str, dict[str, Shape]] = {}
    if plan.chunk_frames is None or plan.tile_size is None:
        return out
    cells = plan.tile_latent
    video = (batch, cfg.in_channels, plan.chunk_frames + 1, cells * plan.spatial_compress,
             cells * plan.spatial_compress)
    out["encoder"] = {"video": video}
    out["decoder"] = {"latent": cfg.encoded_shape(video)}
    return out


def coverage_warnings(component: str, profiles: Sequence[Profile], manifest: Any) -> list[str]:
    """Why the runtime's largest chunk/tile under the export's plan would not fit these profiles (empty: it fits)."""
    shapes = largest_call_shapes(manifest).get(component)
    if not shapes or any(p.contains(shapes) for p in profiles):
        return []
    return [f"{component}: the plan's largest call {', '.join(f'{n} {_dims(s)}' for n, s in shapes.items())} fits no "
            "profile; the runtime will need smaller --tile-size/--chunk-frames with this engine"]

"""Check the uses of TensorRT (usage.py) against API descriptions of real TensorRT releases (describe.py).

Pure functions of plain data, so a fake description tests the checker itself. For every use and every release:

* each step of the chain exists (module attribute, class member, enum member), following the types pybind11 writes
  into the signatures (``network.get_input(i).name``: ``get_input`` returns ``ITensor``, which has ``name``);
* a call matches one overload: not more positional arguments than it takes, every keyword is one of its parameter
  names, every parameter without a default is given; calling a class checks its ``__init__``;
* an assignment (``config.builder_optimization_level = 3``) goes to a property with a setter;
* a use that binds a tracked variable (``network = builder.create_network()``) returns the class the table names.

An optional name (``getattr(trt.BuilderFlag, "TF32", None)``) may be missing from a release but not from all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .usage import MODULE, CallShape, Use

_PREFIX = re.compile(r"^(?:tensorrt_bindings\.tensorrt|tensorrt\.tensorrt|tensorrt_bindings|tensorrt)\.")


# ----- pybind11 signatures ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    kind: str           # "positional" (before /), "either", "keyword" (after *), "varargs", "varkw"
    has_default: bool


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[Param, ...]
    returns: str
    text: str

    def accepts(self, call: CallShape, *, bound: bool) -> str | None:
        """None when ``call`` fits; else why not. ``bound``: the first parameter (self) is already given."""
        params = list(self.params[1:] if bound and self.params else self.params)
        if call.starred:
            return None
        positional = [p for p in params if p.kind in ("positional", "either")]
        if call.positional > len(positional) and not any(p.kind == "varargs" for p in params):
            return f"{call.positional} positional arguments given, it takes {len(positional)}"
        filled = {p.name for p in positional[:call.positional]}
        names = {p.name: p for p in params if p.kind in ("either", "keyword")}
        for k in call.keywords:
            if k in filled:
                return f"{k!r} given twice"
            if k not in names and not any(p.kind == "varkw" for p in params):
                return f"no parameter {k!r} (parameters: {', '.join(p.name for p in params) or 'none'})"
            filled.add(k)
        missing = [p.name for p in params if p.kind not in ("varargs", "varkw") and not p.has_default
                   and p.name not in filled]
        if missing:
            return f"missing argument(s) {', '.join(missing)}"
        return None


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets (types like ``list[tuple[int, int]]``, defaults like ``<Severity.X: 2>``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_signature(text: str) -> Signature:
    """``name(self: X, a: int, b: bool = True) -> R`` as pybind11 writes it."""
    name, _, rest = text.partition("(")
    depth = 1
    for end, ch in enumerate(rest):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            break
    inner, after = rest[:end], rest[end + 1:]
    returns = after.partition("->")[2].strip()
    params: list[Param] = []
    kind = "either"
    raw = _split_top(inner)
    if "/" in raw:
        cut = raw.index("/")
        raw = raw[:cut] + raw[cut + 1:]
        params_before = cut
    else:
        params_before = 0
    for i, part in enumerate(raw):
        if part == "*":
            kind = "keyword"
            continue
        head = part.split("=", 1)[0].split(":", 1)[0].strip()
        if head.startswith("**"):
            params.append(Param(head[2:], "varkw", True))
        elif head.startswith("*"):
            params.append(Param(head[1:], "varargs", True))
            kind = "keyword"
        else:
            p_kind = "positional" if i < params_before else kind
            params.append(Param(head, p_kind, "=" in part.split(":", 1)[-1] or "=" in head))
    return Signature(name.strip(), tuple(params), returns, text)


def class_of_type(type_text: str | None, classes: Mapping[str, Any]) -> str | None:
    """The described class a type annotation names (``tensorrt_bindings.tensorrt.ITensor`` -> ``ITensor``)."""
    if not type_text:
        return None
    t = type_text.strip()
    for pattern in (r"^(?:typing\.)?Optional\[(.*)\]$", r"^(.*?)\s*\|\s*None$"):
        if m := re.match(pattern, t):
            t = m.group(1).strip()
    t = _PREFIX.sub("", t)
    return t if t in classes else None


# ----- one API --------------------------------------------------------------------------------------------------------
@dataclass
class _Where:
    kind: str              # "module" | "class" (the class object) | "instance" | "callable" | "unknown"
    name: str              # class qualname, or a description
    member: dict | None = None


class Api:
    """A describe.py description with lookups by class and member (members of base classes included)."""

    def __init__(self, description: Mapping[str, Any]) -> None:
        self.version = str(description.get("version", "?"))
        self.module: Mapping[str, Any] = description["module"]
        self.classes: Mapping[str, Any] = description["classes"]

    def member(self, cls: str, name: str) -> dict | None:
        for c in [cls, *self.classes.get(cls, {}).get("bases", [])]:
            m = self.classes.get(c, {}).get("members", {}).get(name)
            if m is not None:
                return m
        return None

    def is_a(self, cls: str, wanted: str) -> bool:
        return cls == wanted or wanted in self.classes.get(cls, {}).get("bases", [])


def _signatures(texts: list[str]) -> list[Signature]:
    return [parse_signature(t) for t in texts]


def _call(sigs: list[Signature], call: CallShape, *, bound: bool, what: str) -> tuple[str | None, str | None]:
    """(problem, return type text) of calling one of ``sigs``."""
    if not sigs:
        return None, None  # no signature text (a Python-level helper): existence is all we can check
    reasons = []
    for s in sigs:
        why = s.accepts(call, bound=bound)
        if why is None:
            return None, s.returns
        reasons.append(f"{s.text}: {why}")
    return f"{what}{call} matches no signature: " + "; ".join(reasons), None


def check_use(use: Use, api: Api) -> tuple[str | None, str | None, bool]:
    """(problem, resulting class, an optional name was missing) of one use in one release."""
    here = _Where("module", "trt") if use.root == MODULE else _Where("instance", use.root)
    path = "trt" if use.root == MODULE else use.root
    for i, step in enumerate(use.steps):
        last = i == len(use.steps) - 1
        if here.kind == "module":
            entry = api.module.get(step.name)
            owner = "the tensorrt module"
        elif here.kind in ("class", "instance"):
            if here.name not in api.classes:
                return f"class {here.name} does not exist", None, False
            entry = api.member(here.name, step.name)
            owner = here.name
        else:
            return f"cannot check .{step.name}: {path} is {here.name}", None, False
        if entry is None:
            if step.optional:
                return None, None, True
            return f"{owner} has no {step.name!r}", None, False
        path = f"{path}.{step.name}"
        kind = entry["kind"]
        if step.store:
            if kind != "property":
                return f"{path} is a {kind}, not a property that can be assigned", None, False
            if not entry.get("writable"):
                return f"{path} is a read-only property", None, False
            return None, None, False
        if step.call is not None:
            if kind == "class":
                qual = entry.get("qualname", step.name)
                problem, _ = _call(_signatures(api.classes.get(qual, {}).get("init", [])), step.call, bound=True,
                                   what=path)
                here = _Where("instance", qual)
            elif kind in ("method", "function", "static"):
                bound = kind == "method"
                problem, returns = _call(_signatures(entry.get("signatures", [])), step.call, bound=bound, what=path)
                cls = class_of_type(returns, api.classes)
                here = _Where("instance", cls) if cls else _Where("unknown", f"a {returns or 'value'}")
            else:
                return f"{path} is a {kind}, not callable", None, False
            if problem:
                return problem, None, False
            path += "()"
            continue
        if kind == "class":
            here = _Where("class", entry.get("qualname", step.name))
        elif kind == "property":
            cls = class_of_type(entry.get("type"), api.classes)
            here = _Where("instance", cls) if cls else _Where("unknown", f"a {entry.get('type') or 'value'}")
        elif kind == "value":
            cls = class_of_type(entry.get("type"), api.classes)
            here = _Where("instance", cls) if cls else _Where("unknown", f"a {entry.get('type')}")
        else:
            here = _Where("callable", f"a {kind} that is not called")
        if last:
            break
    result = here.name if here.kind in ("instance", "class") else None
    return None, result, False


def check(uses: list[Use], apis: Mapping[str, Api], table: Mapping[str, str]) -> list[str]:
    """Every problem of ``uses`` in every release of ``apis`` (label -> Api), one line each; empty: conformant."""
    problems: list[str] = []
    for use in uses:
        missing_optional = []
        for label, api in apis.items():
            problem, result, optional_missing = check_use(use, api)
            prefix = f"TensorRT {api.version}: {use.where}: {use.text}"
            if problem:
                problems.append(f"{prefix}: {problem}")
                continue
            if optional_missing:
                missing_optional.append(label)
                continue
            if use.binds is not None:
                wanted = table[use.binds]
                if result is None:
                    problems.append(f"{prefix}: cannot tell what it returns, so {use.binds!r} cannot be checked "
                                    f"against the table's {wanted}")
                elif not api.is_a(result, wanted):
                    problems.append(f"{prefix}: gives {result}, but usage.VARIABLE_TYPES says {use.binds!r} is "
                                    f"{wanted}")
        if missing_optional and len(missing_optional) == len(apis):
            problems.append(f"{use.where}: {use.text}: {use.dotted} exists in no TensorRT release checked "
                            f"({', '.join(a.version for a in apis.values())}); the fallback is dead code or a typo")
    return problems

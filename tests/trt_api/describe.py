"""Print the API of the ``tensorrt`` module in this process as JSON (run by bindings.py with the stub libraries).

Output: ``{"version", "module": {name: entry}, "classes": {qualname: {"bases", "init", "members"}}}``. A module entry is
``{"kind": "class", "qualname"}``, ``{"kind": "function", "signatures"}`` or ``{"kind": "value", "type"}``. A class
member is ``{"kind": "method" | "static", "signatures"}``, ``{"kind": "property", "writable", "type"}``,
``{"kind": "class", "qualname"}`` (a nested class such as ``ILogger.Severity``) or ``{"kind": "value", "type",
"value"}`` (enum members and constants). ``signatures`` are pybind11's text signatures, one per overload, as the
first line(s) of ``__doc__`` show them; ``conformance.py`` parses them.

``--probe MODULE:FUNCTION`` (repeatable) also calls ``FUNCTION(tensorrt)`` from the project and reports
``{"MODULE:FUNCTION": {"result": repr} | {"error": text}}`` under ``"probes"``: project code run against the real enums.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path


def signatures(fn: object) -> list[str]:
    """pybind11 signatures from a docstring: the first line, or the numbered lines of an overloaded function."""
    doc = getattr(fn, "__doc__", None) or ""
    lines = doc.strip().splitlines()
    if not lines:
        return []
    if lines[0].endswith("(*args, **kwargs)") and len(lines) > 1 and lines[1].startswith("Overloaded function"):
        return [m.group(1) for ln in lines if (m := re.match(r"^\d+\. (\w+\(.*)$", ln))]
    return [lines[0]]


def type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__.startswith(("tensorrt", "tensorrt_bindings")) else t.__name__


def describe_class(cls: type, classes: dict) -> None:
    if cls.__qualname__ in classes:
        return
    entry = {"bases": [b.__qualname__ for b in cls.__mro__[1:] if b is not object],
             "init": signatures(cls.__init__) if "__init__" in dir(cls) else [], "members": {}}
    classes[cls.__qualname__] = entry
    for name in dir(cls):
        if name.startswith("__") and name not in ("__call__", "__iter__", "__len__", "__getitem__"):
            continue
        obj = inspect.getattr_static(cls, name)
        if isinstance(obj, property):
            fget_sigs = signatures(obj.fget) if obj.fget is not None else []
            returns = fget_sigs[0].rpartition("->")[2].strip() if fget_sigs and "->" in fget_sigs[0] else None
            entry["members"][name] = {"kind": "property", "writable": obj.fset is not None, "type": returns}
        elif isinstance(obj, staticmethod):
            entry["members"][name] = {"kind": "static", "signatures": signatures(obj.__func__)}
        elif isinstance(obj, type):
            entry["members"][name] = {"kind": "class", "qualname": obj.__qualname__}
            describe_class(obj, classes)
        elif callable(obj) and not isinstance(obj, cls):
            entry["members"][name] = {"kind": "method", "signatures": signatures(getattr(cls, name))}
        else:
            value = int(obj) if hasattr(obj, "__int__") and not isinstance(obj, float) else None
            entry["members"][name] = {"kind": "value", "type": type_name(obj), "value": value}


def probe(spec: str, tensorrt: object) -> dict:
    module, _, function = spec.partition(":")
    try:
        return {"result": repr(getattr(importlib.import_module(module), function)(tensorrt))}
    except Exception as e:  # reported to the test, which asserts on it
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", action="append", default=[], metavar="MODULE:FUNCTION")
    args = parser.parse_args()
    import tensorrt

    module: dict = {}
    classes: dict = {}
    for name in dir(tensorrt):
        if name.startswith("_") and name != "__version__":
            continue
        obj = getattr(tensorrt, name)
        if isinstance(obj, type):
            module[name] = {"kind": "class", "qualname": obj.__qualname__}
            describe_class(obj, classes)
        elif inspect.ismodule(obj):
            module[name] = {"kind": "module"}
        elif callable(obj):
            module[name] = {"kind": "function", "signatures": signatures(obj)}
        else:
            module[name] = {"kind": "value", "type": type_name(obj)}
    probes = {spec: probe(spec, tensorrt) for spec in args.probe}
    json.dump({"version": tensorrt.__version__, "file": str(Path(tensorrt.__file__).resolve()), "module": module,
               "classes": classes, "probes": probes}, sys.stdout)


if __name__ == "__main__":
    main()

"""What ``engines/`` uses of TensorRT, read from the source with :mod:`ast`, so a newly used name is checked without
anyone listing it.

A *use* is an attribute chain that starts at the ``tensorrt`` module or at a variable holding a TensorRT object,
e.g. ``config.set_timing_cache(cache, ignore_mismatch=False)`` or ``trt.Logger.WARNING``. Each step records whether
it is called (with how many positional arguments and which keyword names), assigned to, or reached through
``getattr(obj, "NAME", default)`` / ``hasattr`` (an *optional* name: the code copes with its absence).

Which variables hold which TensorRT class is the hand-kept :data:`VARIABLE_TYPES` (our naming convention:
``builder``, ``network``, ``engine``...); conformance.py confirms each entry wherever such a variable is assigned
from TensorRT (``network = builder.create_network(...)`` must return ``INetworkDefinition``). A name of the table is
not tracked in a function where it is a parameter with a concrete annotation (``engine: str``) or is assigned from
something that is not TensorRT (``engine = opened.engine``, an attribute of the same name, keeps it), nor as
``self.NAME`` where the class declares ``NAME`` with a concrete annotation or as a method/property. Chains through a
subscript (``shapes[0].x``) are not followed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

MODULE = "<module>"

# variable (or self.attribute) name -> TensorRT class it holds; MODULE: the tensorrt module itself
VARIABLE_TYPES = {
    "trt": MODULE,
    "logger": "Logger",
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "cache": "ITimingCache",
    "trt_profile": "IOptimizationProfile",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "dt": "DataType",
}


@dataclass(frozen=True)
class CallShape:
    positional: int
    keywords: tuple[str, ...]
    starred: bool = False          # *args or **kwargs at the call site: counts cannot be checked

    def __str__(self) -> str:
        return "(" + ", ".join(["_"] * self.positional + [f"{k}=" for k in self.keywords]) + ")"


@dataclass(frozen=True)
class Step:
    name: str
    call: CallShape | None = None
    store: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Use:
    """``root`` (MODULE or a class name) followed by ``steps``; ``where`` is file:line, ``text`` the source."""

    where: str
    root: str
    steps: tuple[Step, ...]
    text: str
    binds: str | None = None       # assigned to this tracked variable (its table type must match the result)

    @property
    def dotted(self) -> str:
        head = "trt" if self.root == MODULE else self.root
        return ".".join([head] + [s.name + ("()" if s.call else "") for s in self.steps])


@dataclass
class _Scope:
    tracked: dict[str, str]                 # name -> table type, for this function
    self_attrs: dict[str, str] = field(default_factory=dict)


def _concrete(annotation: ast.expr | None) -> bool:
    """An annotation that says the value is not a TensorRT object (anything but Any / missing)."""
    return annotation is not None and not (isinstance(annotation, ast.Name) and annotation.id == "Any") and not (
        isinstance(annotation, ast.Constant) and annotation.value == "Any")


def _is_tensorrt_import(node: ast.expr) -> bool:
    """``lazy_import("tensorrt", ...)`` or ``importlib.import_module("tensorrt")``."""
    return (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "tensorrt"
            and ((isinstance(node.func, ast.Name) and node.func.id in ("lazy_import", "import_module"))
                 or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")))


class _Collector:
    def __init__(self, source: str, filename: str) -> None:
        self.filename = filename
        self.source = source
        self.tree = ast.parse(source, filename)
        self.uses: list[Use] = []

    # ----- scopes ---------------------------------------------------------------------------------------------------
    def run(self) -> list[Use]:
        module_scope = _Scope(tracked={"trt": MODULE})
        for node in ast.walk(self.tree):   # module-level `import tensorrt as X` / `X = lazy_import("tensorrt")`
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "tensorrt":
                        module_scope.tracked[a.asname or a.name] = MODULE
            elif isinstance(node, ast.Assign) and _is_tensorrt_import(node.value):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        module_scope.tracked[t.id] = MODULE
        self._visit_body(self.tree.body, module_scope, None)
        return self.uses

    def _visit_body(self, body: Iterable[ast.stmt], scope: _Scope, cls: ast.ClassDef | None) -> None:
        for stmt in body:
            if isinstance(stmt, ast.ClassDef):
                self._visit_body(stmt.body, scope, stmt)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit_function(stmt, scope, cls)
            else:
                self._visit_node(stmt, scope)

    def _visit_function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, outer: _Scope,
                        cls: ast.ClassDef | None) -> None:
        tracked = {**{k: v for k, v in VARIABLE_TYPES.items()}, **outer.tracked}
        args = fn.args
        for a in (*args.posonlyargs, *args.args, *args.kwonlyargs):
            if a.arg in tracked and _concrete(a.annotation):
                del tracked[a.arg]
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and node.value is not None:
                targets = [t for t in node.targets if isinstance(t, ast.Name)]
                if _is_tensorrt_import(node.value):
                    for t in targets:
                        tracked[t.id] = MODULE
                    continue
                for t in targets:
                    same_name = isinstance(node.value, ast.Attribute) and node.value.attr == t.id  # engine = x.engine
                    if t.id in tracked and not same_name and self._chain(node.value, _Scope(tracked)) is None:
                        del tracked[t.id]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.target.id in tracked and _concrete(node.annotation):
                    del tracked[node.target.id]
        self_attrs = {}
        if cls is not None and (args.posonlyargs or args.args):
            declared = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                        and _concrete(s.annotation)}
            declared |= {s.name for s in cls.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
            self_attrs = {k: v for k, v in VARIABLE_TYPES.items() if v != MODULE and k not in declared}
        scope = _Scope(tracked, self_attrs)
        for stmt in fn.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit_function(stmt, scope, None)
            elif isinstance(stmt, ast.ClassDef):
                self._visit_body(stmt.body, scope, stmt)
            else:
                self._visit_node(stmt, scope)

    # ----- chains ---------------------------------------------------------------------------------------------------
    def _chain(self, node: ast.expr, scope: _Scope) -> tuple[str, list[Step]] | None:
        """(root type, steps) when ``node`` is an attribute chain on a TensorRT object, else None."""
        if isinstance(node, ast.Name):
            return (scope.tracked[node.id], []) if node.id in scope.tracked else None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in scope.self_attrs:
                return scope.self_attrs[node.attr], []
            inner = self._chain(node.value, scope)
            return None if inner is None else (inner[0], inner[1] + [Step(node.attr)])
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                inner = self._chain(node.args[0], scope)
                if inner is None:
                    return None
                optional = func.id == "hasattr" or len(node.args) == 3
                return inner[0], inner[1] + [Step(node.args[1].value, optional=optional)]
            inner = self._chain(func, scope)
            if inner is None or not inner[1]:
                return None
            shape = CallShape(sum(1 for a in node.args if not isinstance(a, ast.Starred)),
                              tuple(k.arg for k in node.keywords if k.arg is not None),
                              starred=any(isinstance(a, ast.Starred) for a in node.args)
                              or any(k.arg is None for k in node.keywords))
            last = inner[1][-1]
            return inner[0], inner[1][:-1] + [Step(last.name, call=shape, optional=last.optional)]
        return None

    def _record(self, node: ast.expr, root: str, steps: list[Step], binds: str | None = None) -> None:
        if steps:
            text = ast.get_source_segment(self.source, node) or ast.unparse(node)
            self.uses.append(Use(f"{self.filename}:{node.lineno}", root, tuple(steps), " ".join(text.split()),
                                 binds))

    def _visit_node(self, node: ast.AST, scope: _Scope) -> None:
        """Record every maximal chain under ``node``; descend into call arguments, not into a chain's spine."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._visit_function(node, scope, None)
            return
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and (chain := self._chain(target, scope)):
                    root, steps = chain
                    self._record(target, root, steps[:-1] + [Step(steps[-1].name, store=True)])
                    self._visit_args(target, scope)
                else:
                    self._visit_node(target, scope)
            value = node.value
            names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id in scope.tracked]
            if names and (chain := self._chain(value, scope)) and chain[1]:
                self._record(value, *chain, binds=names[0])
                self._visit_args(value, scope)
                return
            self._visit_node(value, scope)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.IfExp):
            # (config.set_flag if on else config.clear_flag)(flag): both branches are called with these arguments
            for branch in (node.func.body, node.func.orelse):
                self._visit_node(ast.copy_location(ast.Call(branch, node.args, node.keywords), node), scope)
            self._visit_node(node.func.test, scope)
            return
        if isinstance(node, ast.expr) and (chain := self._chain(node, scope)) and chain[1]:
            self._record(node, *chain)
            self._visit_args(node, scope)
            return
        for child in ast.iter_child_nodes(node):
            self._visit_node(child, scope)

    def _visit_args(self, node: ast.expr, scope: _Scope) -> None:
        """Arguments of the calls along a chain's spine (they may hold chains of their own)."""
        while True:
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                    for a in node.args[2:]:
                        self._visit_node(a, scope)
                    node = node.args[0]
                    continue
                for a in (*node.args, *(k.value for k in node.keywords)):
                    self._visit_node(a, scope)
                node = node.func
            elif isinstance(node, ast.Attribute):
                node = node.value
            else:
                return


def collect_source(source: str, filename: str) -> list[Use]:
    """The uses of TensorRT in one module's source."""
    return _Collector(source, filename).run()


def collect(paths: Iterable[Path], root: Path | None = None) -> list[Use]:
    """The uses of TensorRT in these files (``where`` relative to ``root`` when given)."""
    uses: list[Use] = []
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else str(path)
        uses += collect_source(path.read_text(), name)
    return uses

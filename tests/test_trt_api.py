"""TensorRT API conformance without a GPU: every TensorRT name and call in engines/ exists in TensorRT 10 and 11.

The real pybind11 bindings of both releases are imported against stub libraries (tests/trt_api/bindings.py; facts in
shared/docs/tensorrt-notes.md), each in its own subprocess, and described as JSON; the uses are read from engines/*.py
with ast (tests/trt_api/usage.py) and checked by tests/trt_api/conformance.py. The ``trt_api`` tests skip, with the
reason, where pip cannot fetch the wheels or there is no gcc; .ci/run fetches them first, so CI runs them. The
checker itself is tested on a fake API (no wheels needed).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from trt_api import bindings
from trt_api.conformance import Api, check, parse_signature
from trt_api.usage import VARIABLE_TYPES, collect, collect_source

REPO = Path(__file__).resolve().parents[1]
PROBES = ("cvvae.engines.build:network_flags",)


@pytest.fixture(scope="module")
def uses():
    return collect(REPO.glob("engines/*.py"), REPO)


@pytest.fixture(scope="module")
def descriptions() -> dict[str, dict]:
    try:
        return {major: bindings.prepare(major).describe(PROBES) for major in ("10", "11")}
    except bindings.BindingsUnavailable as e:
        pytest.skip(f"TensorRT bindings wheels unavailable: {e}")


@pytest.fixture(scope="module")
def apis(descriptions) -> dict[str, Api]:
    return {major: Api(d) for major, d in descriptions.items()}


# ----- the real releases ----------------------------------------------------------------------------------------------
@pytest.mark.trt_api
def test_bindings_are_the_real_releases(descriptions):
    assert descriptions["10"]["version"] == "10.16.1.11"
    assert descriptions["11"]["version"] == "11.4.0.106"
    for d in descriptions.values():
        assert len(d["classes"]) > 150 and "ICudaEngine" in d["classes"]


@pytest.mark.trt_api
def test_engines_use_only_what_tensorrt_10_and_11_have(uses, apis):
    problems = check(uses, apis, VARIABLE_TYPES)
    assert problems == [], "\n".join(problems)


def test_uses_are_read_from_the_source(uses):
    # the reader finds the calls the backend and the builder depend on (so the check above is not vacuous)
    dotted = {u.dotted for u in uses}
    for name in ("trt.Builder()", "Builder.create_network()", "IBuilderConfig.set_timing_cache()",
                 "IBuilderConfig.builder_optimization_level", "Runtime.deserialize_cuda_engine()",
                 "ICudaEngine.get_tensor_profile_shape()", "ICudaEngine.num_io_tensors",
                 "IExecutionContext.execute_async_v3()", "trt.TensorIOMode.INPUT", "trt.Logger.WARNING"):
        assert name in dotted, f"{name} not found among {sorted(dotted)}"
    assert len(uses) >= 45
    store = [u for u in uses if u.steps[-1].store]
    assert [u.dotted for u in store] == ["IBuilderConfig.builder_optimization_level"]


@pytest.mark.trt_api
def test_every_signature_of_both_releases_parses(descriptions):
    count = 0
    for d in descriptions.values():
        for cls in d["classes"].values():
            for text in [*cls["init"], *(s for m in cls["members"].values() for s in m.get("signatures", []))]:
                sig = parse_signature(text)
                assert sig.name and all(p.name for p in sig.params), text
                count += 1
    assert count > 2000


@pytest.mark.trt_api
def test_strongly_typed_flag_comes_from_each_release_enum(descriptions):
    # STRONGLY_TYPED is bit 1 in TensorRT 10 and bit 0 in 11; build.network_flags, run against the real modules
    flag = "cvvae.engines.build:network_flags"
    assert descriptions["10"]["probes"][flag] == {"result": "2"}
    assert descriptions["11"]["probes"][flag] == {"result": "1"}
    assert descriptions["11"]["classes"]["NetworkDefinitionCreationFlag"]["members"]["STRONGLY_TYPED"]["value"] == 0


@pytest.mark.trt_api
def test_dtype_names_the_backend_maps_exist_in_both(apis):
    from cvvae.engines.engine_check import TRT_DTYPES

    for api in apis.values():
        for name in TRT_DTYPES:
            member = api.member("DataType", name)
            assert member and member["kind"] == "value" and member["type"] == "DataType", (api.version, name)


def _remove(description: dict, cls: str, member: str) -> dict:
    d = copy.deepcopy(description)
    del d["classes"][cls]["members"][member]
    return d


def _edit_signature(description: dict, cls: str, member: str, old: str, new: str) -> dict:
    d = copy.deepcopy(description)
    sigs = d["classes"][cls]["members"][member]["signatures"]
    d["classes"][cls]["members"][member]["signatures"] = [s.replace(old, new) for s in sigs]
    return d


@pytest.mark.trt_api
@pytest.mark.parametrize("mutation, expected", [
    (lambda d: _remove(d, "ICudaEngine", "get_tensor_profile_shape"),
     r"engine\.get_tensor_profile_shape\(.*\): ICudaEngine has no 'get_tensor_profile_shape'"),
    (lambda d: _remove(d, "TensorIOMode", "INPUT"), r"trt\.TensorIOMode\.INPUT: TensorIOMode has no 'INPUT'"),
    (lambda d: _remove(d, "IExecutionContext", "execute_async_v3"),
     r"IExecutionContext has no 'execute_async_v3'"),
    (lambda d: _edit_signature(d, "IBuilderConfig", "set_timing_cache", "ignore_mismatch", "ignore"),
     r"config\.set_timing_cache\(cache, ignore_mismatch=False\): IBuilderConfig\.set_timing_cache\(_, ignore_mismatch=\) "
     r"matches no signature: .*no parameter 'ignore_mismatch'"),
    (lambda d: _edit_signature(d, "IOptimizationProfile", "set_shape", ", max:", ", *, max:"),
     r"trt_profile\.set_shape\(.*4 positional arguments given, it takes 3"),
    (lambda d: {**d, "classes": {**d["classes"], "IBuilderConfig": {**d["classes"]["IBuilderConfig"], "members": {
        **d["classes"]["IBuilderConfig"]["members"],
        "builder_optimization_level": {"kind": "property", "writable": False, "type": "int"}}}}},
     r"config\.builder_optimization_level: IBuilderConfig\.builder_optimization_level is a read-only property"),
])
def test_a_name_missing_from_a_release_fails(uses, descriptions, mutation, expected):
    apis = {"10": Api(descriptions["10"]), "11": Api(mutation(descriptions["11"]))}
    problems = check(uses, apis, VARIABLE_TYPES)
    assert problems, "the mutated API passed"
    assert all(p.startswith("TensorRT 11.4.0.106: engines/") for p in problems), problems
    assert any(re.search(expected, p) for p in problems), problems


# ----- the checker on a fake API (no wheels) ------------------------------------------------------------------------
FAKE = {
    "version": "99.0",
    "module": {"Builder": {"kind": "class", "qualname": "Builder"},
               "Flag": {"kind": "class", "qualname": "Flag"},
               "Logger": {"kind": "class", "qualname": "Logger"}},
    "classes": {
        "Logger": {"bases": [], "init": ["__init__(self: trt.Logger) -> None"], "members": {}},
        "Builder": {"bases": [], "init": ["__init__(self: trt.Builder, logger: trt.Logger) -> None"], "members": {
            "create_network": {"kind": "method", "signatures": [
                "create_network(self: tensorrt.tensorrt.Builder, flags: typing.SupportsInt = 0) -> "
                "tensorrt.tensorrt.INetworkDefinition"]},
            "max_threads": {"kind": "property", "writable": False, "type": "int"}}},
        "INetworkDefinition": {"bases": [], "init": [], "members": {
            "add_input": {"kind": "method", "signatures": [
                "add_input(self: tensorrt.tensorrt.INetworkDefinition, name: str, dtype: int, *, shape: list) -> None"
            ]}}},
        "Flag": {"bases": [], "init": [], "members": {"A": {"kind": "value", "type": "Flag", "value": 0}}},
    },
}

FAKE_SOURCE = '''
def build(trt, engine: str):
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1, 2)
    network.add_input("x", 1, shape=[1], name="y")
    network.add_input("x")
    builder.max_threads = 4
    builder.clear_cache()
    flag = trt.Flag.B
    maybe = getattr(trt.Flag, "C", None)
    config = builder.create_network()
    return engine.upper()
'''


def test_checker_reports_each_kind_of_mismatch():
    uses = collect_source(FAKE_SOURCE, "fake.py")
    problems = check(uses, {"99": Api(FAKE)}, VARIABLE_TYPES)
    assert problems == [
        "TensorRT 99.0: fake.py:5: builder.create_network(1, 2): Builder.create_network(_, _) matches no "
        "signature: create_network(self: tensorrt.tensorrt.Builder, flags: typing.SupportsInt = 0) -> "
        "tensorrt.tensorrt.INetworkDefinition: 2 positional arguments given, it takes 1",
        "TensorRT 99.0: fake.py:6: network.add_input(\"x\", 1, shape=[1], name=\"y\"): INetworkDefinition.add_input("
        "_, _, shape=, name=) matches no signature: add_input(self: tensorrt.tensorrt.INetworkDefinition, name: str, "
        "dtype: int, *, shape: list) -> None: 'name' given twice",
        "TensorRT 99.0: fake.py:7: network.add_input(\"x\"): INetworkDefinition.add_input(_) matches no signature: "
        "add_input(self: tensorrt.tensorrt.INetworkDefinition, name: str, dtype: int, *, shape: list) -> None: "
        "missing argument(s) dtype, shape",
        "TensorRT 99.0: fake.py:8: builder.max_threads: Builder.max_threads is a read-only property",
        "TensorRT 99.0: fake.py:9: builder.clear_cache(): Builder has no 'clear_cache'",
        "TensorRT 99.0: fake.py:10: trt.Flag.B: Flag has no 'B'",
        "fake.py:11: getattr(trt.Flag, \"C\", None): trt.Flag.C exists in no TensorRT release checked (99.0); the "
        "fallback is dead code or a typo",
        "TensorRT 99.0: fake.py:12: builder.create_network(): gives INetworkDefinition, but usage.VARIABLE_TYPES says "
        "'config' is IBuilderConfig",
    ]


def test_only_tensorrt_objects_are_tracked():
    # `engine: Path` (a concrete annotation) and `engine = self._engine()` are not ICudaEngine; `self.context` is
    # the table's IExecutionContext, absent from FAKE, so its use is reported
    source = (
        "class E:\n"
        "    engine: Path\n"
        "    context: Any\n"
        "    def run(self):\n"
        "        self.engine.read_bytes()\n"
        "        self.context.execute_async_v3(0)\n"
        "    def other(self, engine: str):\n"
        "        return engine.upper()\n"
        "    def third(self):\n"
        "        engine = self._engine()\n"
        "        return engine.inputs[0]\n"
    )
    uses = collect_source(source, "h.py")
    assert [u.dotted for u in uses] == ["IExecutionContext.execute_async_v3()"]
    assert check(uses, {"99": Api(FAKE)}, VARIABLE_TYPES) == [
        "TensorRT 99.0: h.py:6: self.context.execute_async_v3(0): class IExecutionContext does not exist"]

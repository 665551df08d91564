"""The real TensorRT Python bindings of TensorRT 10 and 11, imported without TensorRT's libraries or a GPU.

Facts: shared/docs/tensorrt-notes.md, "The real TensorRT Python API without TensorRT's libraries". NVIDIA publishes the
pybind11 module alone as small wheels (``tensorrt-cu12-bindings`` 10.x, ``tensorrt-cu13-bindings`` 11.x). Its
``tensorrt.so`` needs ``libnvinfer``, ``libnvinfer_plugin`` and ``libnvonnxparser`` (``.so.10`` / ``.so.11``) and only
the nine plain functions of :data:`STUB_SOURCE` from them, none of which runs at import. So one C file compiled with gcc
into one library per SONAME makes ``import tensorrt`` work: classes, enums, method signatures and properties are the
real ones; only the factories (``trt.Builder(logger)``) fail.

This module downloads the wheels with pip (hash-checked against :data:`RELEASES`) into a cache folder
(``$CVVAE_TRT_BINDINGS_CACHE``, default ``~/.cache/cvvae/trt-bindings``), unpacks them, builds the stubs, and runs
``describe.py`` in a subprocess per version: the dynamic loader reads ``LD_LIBRARY_PATH`` only at process start, and
two versions of the module cannot share one process. Standard library only, so CI can pre-fetch with
``python tests/trt_api/bindings.py --fetch``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DESCRIBE = HERE / "describe.py"


@dataclass(frozen=True)
class Release:
    """One bindings wheel: the pip requirement and the sha256 of each of its published wheel files."""

    major: str
    requirement: str
    sha256: dict[str, str]    # wheel file name -> sha256 (x86_64 Linux; one per CPython version)


RELEASES = {
    "10": Release("10", "tensorrt-cu12-bindings==10.16.1.11", {
        "tensorrt_cu12_bindings-10.16.1.11-cp310-none-manylinux_2_28_x86_64.whl":
            "c1b6a156db4eab526360f5dba375e5c33e1275e3f36b0a7d375febb3db6202fc",
        "tensorrt_cu12_bindings-10.16.1.11-cp311-none-manylinux_2_28_x86_64.whl":
            "150ef2b672487e29a8ea916353467c3e199994fb33589167e3641a928e243aa7",
        "tensorrt_cu12_bindings-10.16.1.11-cp312-none-manylinux_2_28_x86_64.whl":
            "8e339335e7255b3fb3954eca61b4acbbdfcf7b28505bd711914519647ba310c8",
        "tensorrt_cu12_bindings-10.16.1.11-cp313-none-manylinux_2_28_x86_64.whl":
            "f2a08cedfa48e300720e5bed070a45e390ea67dbcf475ffce725d10e0a2b3ba7",
    }),
    "11": Release("11", "tensorrt-cu13-bindings==11.4.0.106", {
        "tensorrt_cu13_bindings-11.4.0.106-cp310-none-manylinux_2_28_x86_64.whl":
            "1d17853da33a186c4d4d39995c1186bb59f643689aabac9c3e33ae5f0ba402f5",
        "tensorrt_cu13_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl":
            "d072ac2a095e2be749fefc847adfb25d5ebe70303401df62ede8fe67a59f27fc",
        "tensorrt_cu13_bindings-11.4.0.106-cp312-none-manylinux_2_28_x86_64.whl":
            "5fc7a6c412881f7212030893bd5531b1a0ff415c72c7678dfe4ead7a7765b38d",
        "tensorrt_cu13_bindings-11.4.0.106-cp313-none-manylinux_2_28_x86_64.whl":
            "bac9a362c9189b5f5dd0444213913846e4b46003237834958e890eff57d86ed5",
        "tensorrt_cu13_bindings-11.4.0.106-cp314-none-manylinux_2_28_x86_64.whl":
            "233f5f02af7940b7cf15a5b526fc16b203d93181473a58588937bf401ca1d293",
    }),
}

# The nine functions tensorrt.so imports (`nm -D --undefined-only`); never called at import, so they only have to exist.
STUB_SOURCE = """\
/* Stand-ins for the functions the TensorRT Python bindings import from libnvinfer, libnvinfer_plugin and
   libnvonnxparser. None of them runs when the module is imported; factories that do run get NULL, which the
   bindings turn into "TypeError: factory function returned nullptr". */
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *name_space) { return 0; }
"""
LIBRARIES = ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser")

# What the `tensorrt-cuXX` sdist installs: a `tensorrt` package re-exporting the bindings.
SHIM = "from tensorrt_bindings import *  # noqa: F401,F403\nfrom tensorrt_bindings import __version__  # noqa: F401\n"


class BindingsUnavailable(RuntimeError):
    """The bindings cannot be prepared here (no network for pip, no gcc, another platform); the text says why."""


def cache_dir() -> Path:
    if os.environ.get("CVVAE_TRT_BINDINGS_CACHE"):
        return Path(os.environ["CVVAE_TRT_BINDINGS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cvvae" / "trt-bindings"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(release: Release, cache: Path | None = None, *, timeout: float = 180) -> Path:
    """The release's wheel for this Python, from the cache or downloaded by pip (both checked against the hashes)."""
    cache = cache or cache_dir()
    wheels = cache / "wheels"
    for name, sha in release.sha256.items():
        path = wheels / name
        if path.is_file() and _sha256(path) == sha:
            return path
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(release.requirement + " " + " ".join(f"--hash=sha256:{h}"
                                                                     for h in release.sha256.values()) + "\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "--quiet", "-d", tmp, "-r", str(requirements)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BindingsUnavailable(f"pip download {release.requirement} took over {timeout:.0f} s") from None
        got = [p for p in Path(tmp).glob("*.whl")]
        if proc.returncode != 0 or len(got) != 1:
            errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
            raise BindingsUnavailable(f"pip could not download {release.requirement} (exit {proc.returncode}): "
                                      + (errors[-1] if errors else "no wheel for this Python/platform"))
        wheel = got[0]
        if release.sha256.get(wheel.name) != _sha256(wheel):
            raise BindingsUnavailable(f"{wheel.name} has no recorded sha256 in tests/trt_api/bindings.py or does not "
                                      "match it; refusing to load it")
        os.replace(wheel, wheels / wheel.name)
    return wheels / wheel.name


def _compiler() -> str:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    raise BindingsUnavailable("no C compiler (gcc) to build the stub TensorRT libraries")


@dataclass(frozen=True)
class Bindings:
    """A prepared release: ``site`` goes on PYTHONPATH (the shim and the bindings), ``lib`` on LD_LIBRARY_PATH."""

    release: Release
    site: Path
    lib: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
        env["PYTHONPATH"] = str(self.site)
        env["LD_LIBRARY_PATH"] = str(self.lib)
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``python -s ARGS`` with these bindings as ``import tensorrt``."""
        return subprocess.run([sys.executable, "-s", *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env())

    def describe(self, probes: tuple[str, ...] = ()) -> dict:
        """The API description of ``describe.py`` (classes, members, signatures; ``probes``: see there)."""
        proc = self.run(str(DESCRIBE), *(a for p in probes for a in ("--probe", p)))
        if proc.returncode != 0:
            raise BindingsUnavailable(f"importing TensorRT {self.release.major} bindings failed: "
                                      + (proc.stderr.strip().splitlines() or ["no output"])[-1])
        api = json.loads(proc.stdout)
        if not Path(api["file"]).is_relative_to(self.site.resolve()):
            raise BindingsUnavailable(f"`import tensorrt` found {api['file']}, not the shim in {self.site}")
        return api


def prepare(major: str, cache: Path | None = None) -> Bindings:
    """Fetch, unpack and stub one release (``"10"`` or ``"11"``); reuses the cache when its stamp matches."""
    release = RELEASES[major]
    cache = cache or cache_dir()
    wheel = fetch_wheel(release, cache)
    compiler = _compiler()
    stamp = json.dumps({"wheel": release.sha256[wheel.name], "stub": hashlib.sha256(STUB_SOURCE.encode()).hexdigest(),
                        "shim": SHIM, "python": sys.version_info[:2]})
    root = cache / f"trt{major}"
    if (root / "stamp.json").is_file() and (root / "stamp.json").read_text() == stamp:
        return Bindings(release, root / "site", root / "lib")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".trt{major}-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp / "site", [n for n in z.namelist() if n.startswith("tensorrt_bindings/")])
        (tmp / "site" / "tensorrt").mkdir()
        (tmp / "site" / "tensorrt" / "__init__.py").write_text(SHIM)
        (tmp / "lib").mkdir()
        source = tmp / "stub.c"
        source.write_text(STUB_SOURCE)
        for lib in LIBRARIES:
            soname = f"{lib}.so.{major}"
            cmd = [compiler, "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(tmp / "lib" / soname), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BindingsUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        (tmp / "stamp.json").write_text(stamp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bindings(release, root / "site", root / "lib")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="download and prepare every release, then exit")
    parser.add_argument("--describe", metavar="MAJOR", choices=sorted(RELEASES), help="print one release's API (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.describe:
            print(json.dumps(prepare(args.describe).describe(), indent=1))
            return 0
        for major in RELEASES:
            b = prepare(major)
            print(f"TensorRT {major}: {b.release.requirement} ready in {b.site.parent}")
    except BindingsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

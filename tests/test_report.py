"""`cvvae report`: a tiny model on 5 real frames at 48x64 -> an offline HTML page whose images exist, whose table
holds numbers, and which is well-formed; plus a headless Chromium screenshot when chromium is installed."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import REPO, VIDEOS
from cvvae.tools.report import ReportConfig, build_report, nice_ceil, shown_frame_indices

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageParser(HTMLParser):
    """Checks nesting (every non-void tag closed in order) and collects image sources, links and table cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag == "td":
            self._in_cell = True
            self.cells.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def test_helpers():
    assert shown_frame_indices(5, 4) == [0, 1, 3, 4]
    assert shown_frame_indices(3, 4) == [0, 1, 2]
    assert shown_frame_indices(17, 1) == [0]
    assert [nice_ceil(v) for v in (0.03, 0.1, 0.11, 0.26, 0.7)] == [0.05, 0.1, 0.2, 0.5, 1.0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    videos = sorted(VIDEOS.glob("*.mp4"))
    if not videos:
        pytest.skip(f"no videos in {VIDEOS} (set CVVAE_SHARED to the shared/ folder)")
    root = tmp_path_factory.mktemp("report")
    import os

    old = os.environ.get("CVVAE_CACHE")
    os.environ["CVVAE_CACHE"] = str(root / "cache")  # the export for onnxruntime goes into a fresh cache
    try:
        cfg = ReportConfig(targets=("torch:fp32", "onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8"),
                           read_kwargs={"max_frames": 5, "size": (48, 64)}, shown_frames=3, threads=1)
        return build_report(videos[0], "random:tiny-v1", root / "out", cfg)
    finally:
        if old is None:
            os.environ.pop("CVVAE_CACHE", None)
        else:
            os.environ["CVVAE_CACHE"] = old


def test_report_page_is_complete_and_offline(report):
    page = report.html_path.read_text()
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    assert page.startswith("<!DOCTYPE html>") and parser.external == []
    # original + (reconstruction + heat map) per target for each shown frame, the plot and the colour bar
    assert (report.frames, report.height, report.width, report.shown) == (5, 48, 64, [0, 2, 4])
    assert [r.target for r in report.results] == ["torch fp32", "onnxruntime fp32", "onnxruntime fp16"]
    assert len(parser.images) == 3 * (1 + 2 * 3) + 2
    for src in parser.images:
        assert not Path(src).is_absolute() and (report.directory / src).stat().st_size > 100, src
    # the table: 3 rows x 9 cells; every numeric cell parses (the first target has no "vs first" values)
    assert len(parser.cells) == 27
    for row in range(3):
        cells = parser.cells[9 * row:9 * row + 9]
        assert cells[0] == report.results[row].target
        numbers = [float(c) for c in cells[1:] if c != "-"]
        assert len(numbers) == (6 if row == 0 else 8) and all(n == n for n in numbers)
    assert "onnxruntime int8" in page and "no int8" in page  # skipped, with the reason
    assert [s["target"] for s in report.skipped] == ["onnxruntime int8"]
    # numbers: fp32 ORT equals torch closely; every PSNR finite and per-frame lists complete
    torch_fp32, ort_fp32, ort_fp16 = report.results
    assert ort_fp32.max_abs_vs_first < 1e-3 and ort_fp16.max_abs_vs_first < 5e-2
    assert all(len(r.psnr_per_frame) == len(r.ssim_per_frame) == 5 for r in report.results)
    assert (report.directory / "report.json").exists()
    assert not list(report.directory.parent.glob(".out.cvvae-tmp-*"))  # written atomically: no temporary left


def test_report_refuses_an_existing_directory(report):
    with pytest.raises(FileExistsError):
        build_report(report.input, "random:tiny-v1", report.directory, ReportConfig(targets=("torch:fp32",)))


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed (apt-get install -y chromium) for the screenshot check")
def test_screenshot_script(report, tmp_path):
    out = tmp_path / "page.png"
    done = subprocess.run(["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(report.directory), str(out),
                           "1024x1400"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000

"""report.html as a real browser shows it: headless Chromium's DOM and a screenshot.

Skipped when ``chromium`` is not on PATH. Chromium runs with networking features
off and a throwaway profile, so the page must render from the file alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

CHROMIUM = shutil.which("chromium")
TIMEOUT_S = 60
WIDTH, HEIGHT = 1200, 2000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")


def _chromium(args: list[str], profile: Path, page: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` with a fresh profile; fail clearly on a hang."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
        page.resolve().as_uri(),
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(command)}")


def _text(dom: str) -> str:
    """Visible text of the dumped DOM, whitespace collapsed."""
    dom = re.sub(r"<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_dom_has_verdict_and_tables(sample_html_file: Path, tmp_path: Path) -> None:
    result = _chromium(["--dump-dom"], tmp_path / "profile", sample_html_file)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert '<section class="banner bad" id="verdict">' in dom
    text = _text(dom)
    assert "Compression report: zoo:lenet5" in text
    assert "Target MISSED" in text and "2 of 3 criteria met" in text
    assert "Size reduction at least 4.00× 3.10× short by 0.90× missed" in text
    assert "Parameters 61,706 49,072 1.26× smaller" in text
    assert "Top-1 accuracy 99.12% 98.72% -0.40 pts" in text
    assert "batch 32, median 0.740 ms 0.459 ms 1.61× faster" in text
    assert "magnitude_prune" in text and "classifier head kept dense" in text
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 4


def test_screenshot_is_a_rendered_page(sample_html_file: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    result = _chromium(
        [f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}"],
        tmp_path / "profile",
        sample_html_file,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    image = mpimg.imread(shot)
    assert image.shape[:2] == (HEIGHT, WIDTH)
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "the screenshot is a blank, single-colour image"
    colours = np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100
    # the red MISSED banner near the top: pixels clearly red, not just grey text
    top = rgb[: HEIGHT // 4]
    red = (top[..., 0] > 0.7) & (top[..., 1] < 0.35) & (top[..., 2] < 0.35)
    assert red.sum() > 200

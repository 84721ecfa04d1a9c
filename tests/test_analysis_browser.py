"""The headless-Chromium check of a report (skipped where no Chromium is installed)."""

from __future__ import annotations

import base64
import io
import shutil

import pytest

from analysis import browser

pytestmark = pytest.mark.skipif(
    not any(shutil.which(n) for n in browser.CHROMIUM_NAMES),
    reason="Chromium is not installed (apt-get install -y chromium)",
)


def _png(width: int, height: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    fig.add_subplot().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_clean_page_passes_and_is_photographed(tmp_path, capsys):
    page = tmp_path / "ok.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>fine</title></head><body>'
        f'<h1>fine</h1><img alt="plot" src="{_png(320, 240)}"><div style="height:1500px"></div>'
        f"</body></html>"
    )
    assert browser.main([str(page)]) == 0
    out = capsys.readouterr().out
    assert "OK: no console errors, all 1 images decoded." in out
    shot = (tmp_path / "ok.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(shot[16:20], "big"), int.from_bytes(shot[20:24], "big")
    assert width == 1280 and height >= 1500  # the whole page, not just the first screen


def test_console_errors_and_broken_images_fail(tmp_path, capsys):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>'
        '<img alt="truncated plot" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA">'
        '<img alt="fine" src="' + _png(100, 80) + '">'
        '<script>console.error("planted console error"); undefinedFunction();</script>'
        "</body></html>"
    )
    assert browser.main([str(page), "--no-screenshot"]) == 1
    err = capsys.readouterr().err
    assert "planted console error" in err
    assert "undefinedFunction" in err
    assert "truncated plot" in err and "'fine'" not in err
    assert not (tmp_path / "broken.png").exists()


def test_missing_page_or_browser_is_a_clear_error(tmp_path, capsys):
    assert browser.main([str(tmp_path / "absent.html")]) == 2
    assert "nox -s report" in capsys.readouterr().err
    (tmp_path / "p.html").write_text("<html></html>")
    assert browser.main([str(tmp_path / "p.html"), "--chromium", "no-such-browser-binary"]) == 2

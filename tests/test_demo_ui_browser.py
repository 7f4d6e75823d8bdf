"""The web demo in headless Chromium: load the page, upload an image, send a prompt, see the answer and the
annotated image (checked on its pixels, as served), and save a screenshot.

Needs Debian's `chromium`, `node` and `tests/browser/node_modules` (`scripts/setup_browser.sh` installs
them); skips with that reason otherwise. Set SPHINX_MLLM_SCREENSHOT_DIR to keep a copy of the screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from sphinx_mllm.inference.chat import SphinxChat  # noqa: E402
from sphinx_mllm.serving.demo_ui import build_demo, display_text, launch_demo  # noqa: E402
from test_demo_ui import ANSWER, WHITE, ScriptedChat, expected_pixels  # noqa: E402

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM}"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None,
                       reason=f"{_missing()}: run scripts/setup_browser.sh (chromium, node, npm ci)"),
    # gradio's queue calls pandas options that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_in_headless_chromium(debug_model_and_processor, tmp_path: Path) -> None:
    model, processor = debug_model_and_processor
    demo = build_demo(ScriptedChat(SphinxChat(model, processor)))
    _, url, _ = launch_demo(demo, host="127.0.0.1", port=_free_port(), block=False)
    image = tmp_path / "input.png"
    Image.new("RGB", (200, 100), WHITE).save(image)
    try:
        proc = subprocess.run(
            ["node", str(BROWSER_DIR / "demo_ui.mjs"), url, str(image), "Detect all people shown in the image.",
             str(tmp_path)],
            cwd=BROWSER_DIR, capture_output=True, text=True, timeout=120, env={**os.environ, "CHROMIUM_PATH": CHROMIUM},
        )
    finally:
        demo.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Detect all people shown in the image." in result["chat"]
    assert "red box" in result["chat"] and "[0.10,0.30,0.50,0.60]" in result["chat"]
    assert "<p>" not in result["chat"] and display_text(ANSWER).startswith("**red box**")
    assert result["coords"].splitlines()[0] == "red box: box (20, 10, 100, 70)"
    assert result["examples"] >= 1 and result["samVisible"] is False
    assert result["problems"] == []
    with Image.open(tmp_path / "annotated.png") as served:
        assert served.size == (200, 100)
        expected_pixels(served)
    shot = tmp_path / "demo_ui.png"
    with Image.open(shot) as img:
        assert img.width >= 1000 and img.height >= 600
    keep = os.environ.get("SPHINX_MLLM_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "demo_screenshot.png")

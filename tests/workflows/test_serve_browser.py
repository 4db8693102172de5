"""The page at ``/`` in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): it loads without
console errors, takes an uploaded image, streams an answer, draws the label chart, shows a --compare pair side
by side, and fits a phone-width screen. A screenshot is kept in the test's tmp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian package `chromium`; `make setup` installs it)", allow_module_level=True)

from lowbit.workflows.serve.app import create_app  # noqa: E402
from lowbit.workflows.serve.limits import Limits  # noqa: E402
from tests.workflows.test_serve import LiveServer, tiny_models  # noqa: E402, F401 (tiny_models: the fixture)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _png(path: Path) -> Path:
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste((200, 20, 20), (10, 10, 50, 54))
    img.save(path)
    return path


def _open(browser: Any, url: str, width: int = 1000) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#models:not(:text('loading models'))")
    return page, errors


def test_page_chat_and_chart(browser: Any, tiny_models: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    server = LiveServer(create_app(tiny_models, Limits(max_tokens=16)))
    try:
        page, errors = _open(browser, server.url + "/")
        assert page.is_visible("#chat-card") and page.is_visible("#classify-card")
        page.set_input_files("#file", str(_png(tmp_path / "item.png")))
        page.wait_for_selector("#preview:not([hidden])")
        page.fill("#question", "what is this item ?")
        page.click("#ask")
        page.wait_for_selector("#answers .pane[data-done='1']", timeout=20_000)
        answer = page.inner_text("#answers .answer")
        stats = page.inner_text("#answers .stats")
        assert answer.strip() and "first token" in stats and "tokens/s" in stats
        page.fill("#labels", "red, green, blue")
        page.click("#classify")
        page.wait_for_selector("#charts .pane[data-done='1']", timeout=20_000)
        assert page.locator("#charts .bar").count() == 3
        widths = page.eval_on_selector_all("#charts .bar", "bars => bars.map(b => parseFloat(b.style.width))")
        assert abs(sum(widths) - 100) < 0.5  # probabilities, as percentages
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert not page.is_visible("#error")
        assert errors == []
    finally:
        server.stop()


def test_page_compare_side_by_side_on_a_phone(browser: Any, tiny_models: dict[str, Any],  # noqa: F811
                                              tmp_path: Path) -> None:
    llava = tiny_models["tiny-llava"]
    server = LiveServer(create_app({"float": llava, "w4": llava}, Limits(max_tokens=8), compare=("float", "w4")))
    try:
        page, errors = _open(browser, server.url + "/", width=375)
        assert not page.is_visible("#classify-card")
        page.set_input_files("#file", str(_png(tmp_path / "item.png")))
        page.wait_for_selector("#preview:not([hidden])")
        page.click("#ask")
        try:
            page.wait_for_function("document.querySelectorAll('#answers .pane[data-done=\"1\"]').length == 2",
                                   timeout=20_000)
        except Exception:
            raise AssertionError(repr(page.inner_text("body")) + str(errors)) from None
        titles = page.locator("#answers .pane h3").all_inner_texts()
        assert [t.split(" ·")[0] for t in titles] == ["float", "w4"]
        answers = page.locator("#answers .answer").all_inner_texts()
        assert answers[0] == answers[1] and answers[0].strip()  # one model under two names: same greedy answer
        # nothing wider than the phone's screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / "serve-phone.png"), full_page=True)
        assert errors == []
    finally:
        server.stop()


"""The page `cnnkit serve` shows, driven in Debian's headless chromium by Playwright against a real server.

Draws a digit with mouse (pointer) events and predicts it, uploads a real MNIST test digit through the
file input, and checks that a CIFAR-style RGB run gets an upload-only page. A screenshot of the page after
a prediction goes to docs/serve.png (for the README) when that file is missing or $CNNKIT_SCREENSHOT is
set, else next to the test's temporary files, so an ordinary test run leaves the working tree clean.
Skipped, saying why, only when no chromium binary (or the Playwright package) is installed; CI installs
chromium with .ci/install-browser. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_serve import Server, mnist_run, mnist_test_digits, png_bytes, rgb_run, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "serve.png"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

sync_api = pytest.importorskip("playwright.sync_api", reason="the Playwright package is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (install it: .ci/install-browser, "
                                                "or apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def mnist_server(tmp_path_factory) -> Iterator[Server]:
    server = start_server(mnist_run(tmp_path_factory))
    yield server
    stop_server(server)


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 820, "height": 560}, device_scale_factor=1)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # An answer's status is the page's business (a 415 is shown to the user); a missing file or a crash is not.
    page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
            if response.status == 404 or response.status >= 500 else None)
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not problems, problems


def open_page(page, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='true']")


def predictions(page) -> int:
    return int(page.get_attribute("#result-panel", "data-predictions"))


def wait_for_prediction(page, after: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('result-panel').dataset.predictions) > {after}")
    page.wait_for_function("document.getElementById('status').textContent === ''")


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw strokes on #canvas with the mouse; points are fractions of the canvas's width and height."""
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()


SEVEN = [[(0.28, 0.24), (0.72, 0.24), (0.46, 0.80)]]
ONE = [[(0.5, 0.2), (0.5, 0.8)]]


def test_page_shows_the_run_and_a_drawn_digit_is_predicted(page, mnist_server):
    open_page(page, mnist_server)
    assert "mnist" in page.text_content("#run") and "test accuracy" in page.text_content("#run")
    assert page.is_visible("#canvas")
    page.uncheck("#live")  # predict only when asked, so the click below is the one answered
    before = predictions(page)
    draw(page, SEVEN)
    page.click("#predict")
    wait_for_prediction(page, before)
    assert page.text_content("#label") == "7"
    assert page.text_content("#confidence").endswith("%")
    assert page.locator("#bars .bar-name").count() == 3
    assert page.locator("#bars .bar-name").first.text_content() == "7"
    assert page.get_attribute("#seen", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('seen').naturalWidth") == 28

    page.click("#clear")
    assert page.text_content("#label") == "" and page.locator("#bars .bar-name").count() == 0


def test_predict_as_you_draw(page, mnist_server):
    open_page(page, mnist_server)
    assert page.is_checked("#live")
    before = predictions(page)
    draw(page, ONE)  # no click: the debounced prediction after the stroke answers
    wait_for_prediction(page, before)
    assert page.text_content("#label") == "1"


def test_uploading_a_real_mnist_digit(page, mnist_server, tmp_path):
    images, labels = mnist_test_digits(8)
    index = 0  # the first MNIST test digit, a clear 7
    path = tmp_path / f"mnist-test-{index}.png"
    path.write_bytes(png_bytes(images[index]))
    open_page(page, mnist_server)
    before = predictions(page)
    page.set_input_files("#upload", str(path))
    wait_for_prediction(page, before)
    assert page.text_content("#label") == labels[index]
    assert page.is_visible("#preview")
    assert not page.is_visible("#error")

    draw(page, SEVEN)  # the screenshot for the README: a drawn 7 and its answer
    page.click("#predict")
    wait_for_prediction(page, before + 1)
    target = SCREENSHOT if os.environ.get("CNNKIT_SCREENSHOT") or not SCREENSHOT.exists() else tmp_path / "serve.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 5_000


def test_the_why_toggle_shows_a_heatmap_of_the_answer(page, mnist_server, tmp_path):
    images, labels = mnist_test_digits(8)
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(images[0]))
    open_page(page, mnist_server)
    before = predictions(page)
    page.set_input_files("#upload", str(path))
    wait_for_prediction(page, before)
    assert not page.is_visible("#heatmap")  # off by default: a heatmap costs a backward pass
    page.check("#why")
    page.set_input_files("#upload", str(path))
    wait_for_prediction(page, before + 1)
    assert page.is_visible("#heatmap") and f"“{labels[0]}”" in page.text_content("#why-caption")
    size = page.evaluate("[document.getElementById('heatmap').naturalWidth, "
                         "document.getElementById('heatmap').naturalHeight]")
    assert size == [280, 280]
    page.uncheck("#why")
    page.set_input_files("#upload", str(path))
    wait_for_prediction(page, before + 2)
    assert not page.is_visible("#heatmap")


def test_a_wrong_file_shows_the_servers_message(page, mnist_server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    open_page(page, mnist_server)
    page.set_input_files("#upload", str(notes))
    page.wait_for_selector("#error", state="visible")
    assert "not an image" in page.text_content("#error") and "415" in page.text_content("#error")


def test_an_rgb_run_gets_an_upload_only_page(page, tmp_path_factory, tmp_path):
    import numpy as np

    server = start_server(rgb_run(tmp_path_factory))
    try:
        open_page(page, server)
        assert page.is_hidden("#canvas") and page.is_hidden("#predict")
        photo = tmp_path / "photo.png"
        photo.write_bytes(png_bytes(np.random.default_rng(2).integers(0, 256, (3, 40, 60), dtype=np.uint8)))
        before = predictions(page)
        page.set_input_files("#upload", str(photo))
        wait_for_prediction(page, before)
        assert page.text_content("#label") in {"airplane", "automobile", "bird", "cat"}
        assert page.evaluate("document.getElementById('seen').naturalWidth") == 32
        assert "no test accuracy recorded" in page.text_content("#run")
    finally:
        stop_server(server)

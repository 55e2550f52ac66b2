"""The web page in a real browser: Debian's headless Chromium driven by Playwright against a real
uvicorn server on 127.0.0.1. Creates a model from generated good images through the page, inspects
a defective and a good image, and checks verdicts, the rendered overlay, the threshold slider and
the CSV download. Set ASTFAD_SERVE_SCREENSHOT=docs/serve.png to also write the README picture."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import threading
import time

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from astfad.data.synthetic import generate_synthetic_dataset  # noqa: E402
from astfad.serve.app import create_app  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.access(p, os.X_OK)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (apt-get install -y chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A real uvicorn server in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(tmp_path / "models"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


def test_fit_and_inspect_in_the_browser(server, tmp_path):
    data = generate_synthetic_dataset(tmp_path / "data", categories=["washer"], n_train=6, n_test_good=1,
                                      n_test_per_defect=1, size=256)
    washer = data / "washer"
    train = sorted((washer / "train" / "good").glob("*.png"))
    inspect = tmp_path / "inspect"
    inspect.mkdir()
    shown = []
    for kind in ("blob", "scratch", "good"):  # every test folder numbers its images from 000
        shown.append(inspect / f"{kind}_000.png")
        shutil.copy(washer / "test" / kind / "000.png", shown[-1])
    defect, good = shown[0], shown[2]

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 920}, accept_downloads=True)
        failures: list[str] = []  # failed requests and console errors (a CSP violation is one)
        page.on("requestfailed", lambda r: failures.append(r.url))
        page.on("console", lambda m: failures.append(m.text) if m.type == "error" else None)
        page.goto(server + "/")
        page.wait_for_function("() => document.querySelector('#server-status').textContent.startsWith('astfad')")

        # create a model through the page
        page.fill("#fit-name", "washer")
        page.select_option("#fit-strategy", "texture")
        page.fill("#fit-shots", "4")
        page.set_input_files("#fit-files", [str(x) for x in train])
        page.click("#fit-start")
        page.wait_for_function("() => document.querySelector('#model-select').value === 'washer'", timeout=120_000)
        assert page.text_content("#fit-stage") == "done"
        assert "texture" in page.text_content("#model-info")

        # inspect a defective, another defective and a good image
        page.set_input_files("#test-files", [str(x) for x in shown])
        page.wait_for_function(
            "() => [...document.querySelectorAll('.result')].length === 3 && [...document.querySelectorAll('.result')]"
            ".every(c => c.querySelector('img.overlay').naturalWidth > 0 && !c.classList.contains('pending'))",
            timeout=60_000)
        verdicts = {card.query_selector(".file").text_content(): card.query_selector(".verdict").text_content()
                    for card in page.query_selector_all(".result")}
        assert verdicts[defect.name] == "anomalous" and verdicts[good.name] == "normal"
        assert page.eval_on_selector(".result img.overlay", "img => img.naturalWidth") == 256
        assert page.eval_on_selector(".result canvas.outline", "c => c.width") == 256
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        if os.environ.get("ASTFAD_SERVE_SCREENSHOT"):
            page.screenshot(path=os.environ["ASTFAD_SERVE_SCREENSHOT"], full_page=True)

        # the slider recolours verdicts without asking the server again
        page.eval_on_selector("#threshold", "s => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
        assert {c.query_selector(".verdict").text_content() for c in page.query_selector_all(".result")} == {"normal"}
        page.click("#reset-threshold")
        assert page.text_content(".result:first-child .verdict") in ("anomalous", "normal")

        # the session's results as CSV
        with page.expect_download() as download:
            page.click("#download-csv")
        saved = tmp_path / "results.csv"
        download.value.save_as(saved)
        rows = list(csv.DictReader(saved.open()))
        assert sorted(r["file"] for r in rows) == sorted(x.name for x in shown)
        assert {r["verdict"] for r in rows if r["file"] == defect.name} == {"anomalous"}
        assert not failures, failures
        browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000

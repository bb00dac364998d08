"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against a
real `xllm serve` process on the tiny random model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers
from tests.servers import ServerProcess

CHROMIUM = Path(os.environ.get("XLLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A fake microphone (a beep) that needs no permission prompt, for the Record button.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
# Records CSP violations, and what the page hands to fetch (FormData fields; files as
# name/size/type): Chromium does not report multipart bodies holding files to Playwright, so the
# request is inspected here.
RECORD_FETCH = """
window.__sent = [];
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
const realFetch = window.fetch;
window.fetch = function (input, init) {
  if (init && init.body instanceof FormData) {
    window.__sent.push({
      url: String(input),
      headers: init.headers || {},
      fields: [...init.body.entries()].map(([name, value]) =>
        typeof value === "string"
          ? { name, value }
          : { name, filename: value.name, size: value.size, type: value.type }),
    });
  }
  return realFetch.apply(this, arguments);
};
"""


def wait_until(page, predicate: str, timeout: float = 20) -> None:
    """Poll a JS function until it returns true (Playwright's wait_for_function compiles its
    predicate with `new Function`, which the page's Content-Security-Policy rightly refuses)."""
    servers.wait_until(lambda: page.evaluate(predicate), timeout, predicate, interval=0.05)


@pytest.fixture(scope="module")
def web_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """`xllm serve` on the tiny model, with a 2 MiB upload limit (to see a real 413)."""
    logs = tmp_path_factory.mktemp("web-logs")
    server = ServerProcess(tiny_model_dir, logs, "--max-upload-mb", "2")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium) — the web page is not tested")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, web_server):
    """open_page(width=1000, height=700) -> a Page on the server's `/`, once the model is ready."""
    contexts = []

    def open_(width: int = 1000, height: int = 700):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        context.add_init_script(RECORD_FETCH)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(f"{web_server.url}/")
        wait_until(page, "() => document.getElementById('status').textContent.startsWith('ready')")
        return page

    yield open_
    for context in contexts:
        context.close()

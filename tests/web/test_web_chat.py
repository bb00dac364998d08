"""The chat page at `/`, driven in headless Chromium against a real server (tiny random model:
its answers are noise, which is all a UI test needs)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests import servers
from tests.servers import ServerProcess
from tests.web.conftest import wait_until

RED = (220, 30, 30)
PLACEHOLDER = re.compile(r"<(image|audio|video)>")


def png(shape: str, color: tuple[int, int, int], size: int = 160) -> bytes:
    """A toy-world picture: one coloured circle or square on white."""
    image = Image.new("RGB", (size, size), "white")
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sent(page, path: str = "chat") -> list[dict]:
    """What the page gave fetch for each POST /chat (or /v1/files): {url, headers, fields}."""
    return [r for r in page.evaluate("window.__sent") if r["url"].endswith(path)]


def field(request: dict, name: str) -> str:
    return next(f["value"] for f in request["fields"] if f["name"] == name)


def values(request: dict, name: str) -> list[str]:
    return [f["value"] for f in request["fields"] if f["name"] == name]


def uploaded(page) -> list[str]:
    """The files the page uploaded (POST /v1/files), in order."""
    return [f["filename"] for r in sent(page, "v1/files") for f in files(r, "file")]


def files(request: dict, name: str) -> list[dict]:
    return [f for f in request["fields"] if f["name"] == name and "filename" in f]


def settings(page, ignore_eos: bool = False, **values: str) -> None:
    """Fill in the Settings panel (opened, then closed again) as a person would."""
    if not page.locator("#settings").evaluate("d => d.open"):
        page.click("#settings summary")
    for label, value in values.items():
        page.get_by_label(label.replace("_", " ").capitalize(), exact=True).fill(value)
    page.get_by_label("Ignore end of text").set_checked(ignore_eos)
    page.click("#settings summary")


def wait_for_answer(page, index: int, timeout: float = 60) -> str:
    """Wait until the index-th answer is complete; return its exact text.

    `timeout` (seconds) only bounds a hang; past it the failure shows what the page shows.
    """
    answer = page.locator(".msg.assistant").nth(index)
    try:
        answer.locator(".meta").wait_for(timeout=timeout * 1000)
    except PlaywrightTimeoutError:
        shown = page.locator("#main").inner_text()
        raise AssertionError(
            f"answer {index} incomplete after {timeout:g} s; page errors {page.errors}; "
            f"the page shows:\n{shown}"
        ) from None
    assert answer.get_attribute("aria-busy") == "false"
    return answer.locator(".text").text_content()


def as_history(text: str) -> str:
    """How the page sends an earlier answer: placeholders in it never bind media."""
    return PLACEHOLDER.sub("<\u200b\\1>", text)


def drop_file(page, name: str, mime: str, data: bytes) -> None:
    """Drag-and-drop a file onto the conversation (a DataTransfer made in the page)."""
    page.evaluate(
        """([name, mime, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dataTransfer = new DataTransfer();
            dataTransfer.items.add(new File([bytes], name, { type: mime }));
            const target = document.getElementById("main");
            for (const type of ["dragenter", "dragover", "drop"]) {
              target.dispatchEvent(
                new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer }));
            }
        }""",
        [name, mime, base64.b64encode(data).decode()],
    )


def test_chat_with_image_history_recording_and_screenshot(open_page, web_server, tmp_path):
    page = open_page()
    red_circle = png("circle", RED)
    settings(page, temperature="0.7", max_tokens="32")

    # Turn 1: an image from the file picker, previewed, then the question; Enter sends.
    page.set_input_files(
        "#file-input",
        files=[{"name": "red-circle.png", "mimeType": "image/png", "buffer": red_circle}],
    )
    preview = page.locator(".attachment[data-kind=image] img")
    preview.wait_for()
    wait_until(page, "() => document.querySelector('.attachment img').naturalWidth === 160")
    page.fill("#prompt", "What is in the image?")
    page.press("#prompt", "Enter")
    first = wait_for_answer(page, 0)
    assert first, "no answer appeared"
    assert "tokens" in page.locator(".msg.assistant .meta").first.inner_text()
    assert page.locator(".msg.user img").first.evaluate("img => img.naturalWidth") == 160
    assert page.evaluate("document.activeElement.id") == "prompt"

    (request,) = sent(page)
    assert json.loads(field(request, "messages")) == [
        {"role": "user", "content": "<image>\nWhat is in the image?"}
    ]
    # The image went up once (POST /v1/files); the chat request names it by its handle.
    assert files(request, "image") == [] and uploaded(page) == ["red-circle.png"]
    (first_handle,) = values(request, "file_id")
    assert first_handle.startswith("file-")
    assert field(request, "stream") == "true"
    assert field(request, "temperature") == "0.7" and field(request, "max_tokens") == "32"

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    check_screenshot(shot)
    if os.environ.get("XLLM_WEB_SCREENSHOT"):  # e.g. docs/screenshot.png
        page.screenshot(path=os.environ["XLLM_WEB_SCREENSHOT"])

    # Turn 2: a dropped image and a microphone recording; Shift+Enter is a newline, not a send.
    drop_file(page, "blue-square.png", "image/png", png("square", (40, 80, 220)))
    page.click("#record")
    page.locator("#record.recording").wait_for()
    time.sleep(1.0)
    page.click("#record")
    page.locator(".attachment[data-kind=audio] audio").wait_for()
    assert page.locator(".attachment").count() == 2
    page.click("#prompt")
    page.keyboard.type("And this one?")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Same colour?")
    assert page.input_value("#prompt") == "And this one?\nSame colour?"
    assert len(sent(page)) == 1
    page.keyboard.press("Enter")
    second = wait_for_answer(page, 1)
    assert second

    request = sent(page)[1]
    assert json.loads(field(request, "messages")) == [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": as_history(first)},
        {"role": "user", "content": "<image><audio>\nAnd this one?\nSame colour?"},
    ]
    # Every file of the conversation is named again, in order, so each placeholder binds its
    # own; only the new ones were uploaded, each once.
    handles = values(request, "file_id")
    assert len(handles) == 3 and handles[0] == first_handle and len(set(handles)) == 3
    assert files(request, "image") == files(request, "audio") == []
    names = uploaded(page)
    assert names[:2] == ["red-circle.png", "blue-square.png"] and len(names) == 3
    assert names[2].startswith("recording-")
    (recording,) = [f for f in sent(page, "v1/files")[2]["fields"] if f["name"] == "file"]
    assert recording["size"] > 1000 and recording["type"].startswith("audio/")
    assert page.locator(".msg .error").count() == 0
    assert page.errors == [] and page.evaluate("window.__csp") == []

    # New chat: an empty conversation (its handles deleted), and the next request carries no
    # history.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    servers.wait_until(
        lambda: httpx.get(f"{web_server.url}/v1/files", timeout=5).json()["data"] == [],
        what="the old conversation's handles to be deleted",
    )
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    wait_for_answer(page, 0)
    assert json.loads(field(sent(page)[2], "messages")) == [{"role": "user", "content": "hello"}]
    assert values(sent(page)[2], "file_id") == []


def check_screenshot(path: Path) -> None:
    """Not blank: many distinct colours, and the red circle's preview really drawn."""
    image = Image.open(path).convert("RGB")
    assert image.size == (1000, 700)
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) > 200, f"the screenshot looks blank ({len(colours)} colours)"
    red = sum(n for n, (r, g, b) in colours if r > 180 and g < 80 and b < 80)
    assert red > 500, "the image preview is not on the screenshot"


@contextlib.contextmanager
def engine_held(server: ServerProcess) -> Iterator[None]:
    """The server's engine process stopped (SIGSTOP) for the block: no token is generated."""
    pid = server.engine_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def free_slots(server: ServerProcess) -> None:
    servers.wait_until(
        lambda: server.metric("xllm_num_requests_running") == 0, what="the slot to be freed"
    )


def test_stop_button_cancels_the_generation(open_page, web_server):
    page = open_page()
    settings(page, ignore_eos=True, max_tokens="1500")
    page.fill("#prompt", "Tell me a long story.")
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").first
    wait_until(page, "() => document.querySelector('.msg.assistant .text').textContent.length > 20")
    generated = web_server.metric("xllm_generated_tokens_total")
    with engine_held(web_server):  # the answer is still being written, on any machine
        assert page.is_visible("#stop") and page.is_disabled("#send")
        assert web_server.metric("xllm_num_requests_running") == 1
        page.click("#stop")
    free_slots(web_server)
    # Stopped, not run to its 1,500 tokens.
    assert web_server.metric("xllm_generated_tokens_total") - generated < 1500
    answer.locator(".meta").wait_for()
    assert "stopped" in answer.locator(".meta").inner_text()
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    partial = answer.locator(".text").text_content()
    assert len(partial) > 0

    # The partial answer stays in the conversation.
    settings(page, max_tokens="4")
    page.fill("#prompt", "Go on.")
    page.press("#prompt", "Enter")
    wait_for_answer(page, 1)
    messages = json.loads(field(sent(page)[1], "messages"))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == as_history(partial)
    assert field(sent(page)[0], "ignore_eos") == "true"
    assert field(sent(page)[0], "max_tokens") == "1500"

    # New chat in the middle of an answer: the request is cancelled and nothing of it remains.
    settings(page, ignore_eos=True, max_tokens="1500")
    page.fill("#prompt", "Another long one.")
    page.press("#prompt", "Enter")
    wait_until(page, "() => document.querySelectorAll('.msg.assistant')[2].textContent.length > 20")
    generated = web_server.metric("xllm_generated_tokens_total")
    with engine_held(web_server):
        page.click("#new-chat")
    free_slots(web_server)
    assert web_server.metric("xllm_generated_tokens_total") - generated < 1500
    wait_until(page, "() => document.querySelectorAll('.msg').length === 0")
    assert page.input_value("#prompt") == ""
    assert page.is_enabled("#send") and page.is_hidden("#stop")
    assert page.errors == [] and page.evaluate("window.__csp") == []


def test_errors_are_shown_inline(open_page, web_server):
    page = open_page()

    def send(text: str) -> str:
        """Send `text`; return the new error shown in the conversation."""
        errors = page.locator(".msg .error")
        before = errors.count()
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
        errors.nth(before).wait_for()
        return errors.nth(before).inner_text()

    # 415 from the server: the turn is not kept, and goes back into the message box.
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"></svg>'
    page.set_input_files(
        "#file-input", files=[{"name": "d.svg", "mimeType": "image/svg+xml", "buffer": svg}]
    )
    text = send("What is this?")
    assert "(415)" in text and "SVG" in text
    assert page.input_value("#prompt") == "What is this?"
    assert page.locator(".attachment").count() == 1
    page.click(".attachment button")  # remove it
    assert page.locator(".attachment").count() == 0

    # 413 from the server's upload limit (2 MiB here).
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(3 * 2**20)
    page.set_input_files(
        "#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}]
    )
    assert "Too large (413)" in send("What is this?")
    page.click("#new-chat")

    # 429 with Retry-After (the server's JSON error body, replayed).
    def busy(route):
        route.fulfill(
            status=429,
            headers={"Retry-After": "7"},
            content_type="application/json",
            body=json.dumps({"error": {"message": "too many", "type": "rate_limit", "code": 429}}),
        )

    page.route("**/chat", busy)
    text = send("hi")
    assert "(429)" in text and "too many" in text and "try again in 7 s" in text
    page.unroute("**/chat")
    page.click("#new-chat")

    # An error event in the middle of the SSE stream: the partial answer stays, the error shows.
    events = [{"id": "x", "delta": "Hel"}, {"error": {"message": "boom", "type": "x", "code": 500}}]
    page.route(
        "**/chat",
        lambda route: route.fulfill(
            content_type="text/event-stream",
            body="".join(f"data: {json.dumps(e)}\n\n" for e in events),
        ),
    )
    text = send("hi")
    assert "ended early" in text and "(500): boom" in text
    assert page.locator(".msg.assistant .text").text_content() == "Hel"
    page.unroute("**/chat")
    page.click("#new-chat")

    # 401: the API-key field appears; the key is sent as a Bearer token and kept per tab.
    page.route(
        "**/chat",
        lambda route: route.fulfill(
            status=401,
            content_type="application/json",
            body=json.dumps({"error": {"message": "missing key", "type": "x", "code": 401}}),
        ),
    )
    assert page.is_hidden("#api-key")
    assert "(401)" in send("hi")
    assert page.is_visible("#api-key")
    page.unroute("**/chat")
    page.fill("#api-key", "sekrit")
    page.press("#api-key", "Enter")
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    wait_for_answer(page, 0)  # this server has no key: any is accepted
    assert sent(page)[-1]["headers"] == {"Authorization": "Bearer sekrit"}
    assert page.evaluate("sessionStorage.getItem('xllm.apiKey')") == "sekrit"
    assert page.errors == [] and page.evaluate("window.__csp") == []


def test_phone_width_and_keyboard(open_page, web_server):
    page = open_page(width=375, height=740)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for selector in ("#prompt", "#send", "#attach", "#record", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        assert box["y"] + box["height"] <= 740, selector
    # Every control has an accessible name, and Tab goes from the message box to the buttons.
    for control in ("Attach", "Record", "Send", "New chat"):
        assert page.get_by_role("button", name=control, exact=True).count() == 1, control
    assert page.get_by_label("Max tokens", exact=True).count() == 1
    assert page.get_by_label("Temperature", exact=True).count() == 1
    assert page.get_by_role("textbox", name=re.compile("Message")).count() == 1
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "attach"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "record"
    # The page itself and its assets are served with the right types and no outside sources.
    index = httpx.get(f"{web_server.url}/", timeout=5)
    assert index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert "http" not in re.sub(r'xmlns="[^"]+"', "", index.text)
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{web_server.url}/static/{name}", timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert httpx.get(f"{web_server.url}/static/app.py", timeout=5).status_code == 404
    assert httpx.get(f"{web_server.url}/static/..%2Frouters%2Fweb.py", timeout=5).status_code == 404
    assert page.errors == [] and page.evaluate("window.__csp") == []

"""Remote media: allowed hosts only, public addresses only, size and time limits."""

from __future__ import annotations

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.media import make_png
from tests.server.reliability import (
    MB,
    assert_error,
)
from tests.servers import InProcessServer


class _CountingHandler(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        body = make_png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def image_url_body(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}


def test_remote_media_on_loopback_is_refused_after_resolution(tiny_model):
    media_host = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=media_host.serve_forever, daemon=True).start()
    port = media_host.server_address[1]
    try:
        with InProcessServer(
            tiny_model, allow_remote_media="localhost,127.0.0.1", max_model_len=64
        ) as server:
            url = f"{server.url}/v1/chat/completions"
            for media_url in (f"http://localhost:{port}/a.png", f"http://127.0.0.1:{port}/a.png"):
                r = httpx.post(url, json=image_url_body(media_url), timeout=30)
                assert_error(r, 400, words=("non-public address",))
            r = httpx.post(url, json=image_url_body(f"http://example.com:{port}/a.png"), timeout=30)
            assert_error(r, 400, words=("not in the allowed list",))
            for media_url in (f"ftp://localhost:{port}/a.png", "file:///etc/passwd"):
                assert_error(httpx.post(url, json=image_url_body(media_url), timeout=30), 400)
        assert _CountingHandler.hits == 0  # nothing ever connected to the loopback media host
    finally:
        media_host.shutdown()
        media_host.server_close()


class FakeInternet:
    """DNS answers (host -> addresses, consumed in order when a list of lists) and HTTP replies
    (host -> handler) for RemoteMediaFetcher, through a monkeypatched resolver and a mock
    transport; records every request that would have left the machine."""

    def __init__(self, monkeypatch, dns: dict, sites: dict) -> None:
        from xllm.server import remote_media

        self.dns = {host: list(answers) for host, answers in dns.items()}
        self.sites = sites
        self.requests: list[httpx.Request] = []
        self.lookups: list[str] = []

        async def resolve(host: str, port: int) -> list[str]:
            self.lookups.append(host)
            answers = self.dns.get(host)
            if not answers:
                raise socket.gaierror("no such host")
            return answers.pop(0) if isinstance(answers[0], list) else answers

        monkeypatch.setattr(remote_media, "resolve", resolve)

    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return await self.sites[request.headers["host"].split(":")[0]](request)

        return httpx.MockTransport(handle)

    def fetcher(self, hosts: list[str], max_bytes: int = MB, timeout: float = 5.0):
        from xllm.server.remote_media import RemoteMediaFetcher

        return RemoteMediaFetcher(hosts, max_bytes, timeout, transport=self.transport())


def fetch(fetcher, url: str):
    from xllm.server.errors import ServingError

    try:
        return asyncio.run(fetcher.fetch(url))
    except ServingError as exc:
        return exc


PUBLIC = "93.184.215.14"


async def png_reply(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=make_png())


def test_remote_fetch_connects_to_the_checked_address_of_an_allowed_host(monkeypatch):
    net = FakeInternet(monkeypatch, {"media.example": [PUBLIC]}, {"media.example": png_reply})
    data = fetch(net.fetcher(["media.example"]), "https://media.example/cat.png?size=1")
    assert data == make_png()
    (request,) = net.requests
    # Pinned: the connection goes to the address that was checked, never to a second lookup.
    assert request.url.host == PUBLIC and request.url.path == "/cat.png"
    assert request.url.query == b"size=1"
    assert request.headers["host"] == "media.example"
    assert request.extensions["sni_hostname"] == "media.example"  # TLS still checks the name
    assert request.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.7",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
        "224.0.0.1",
    ],
)
def test_remote_fetch_refuses_private_addresses(monkeypatch, address):
    net = FakeInternet(monkeypatch, {"media.example": [PUBLIC, address]}, {})
    error = fetch(net.fetcher(["media.example"]), "http://media.example/a.png")
    assert error.status == 400 and "non-public address" in error.message
    assert net.requests == []


def test_remote_fetch_redirects_are_checked_like_the_first_url(monkeypatch):
    async def to_other_host(request):
        return httpx.Response(302, headers={"Location": "http://internal.example/secret"})

    async def to_same_host(request):
        if request.url.path == "/moved":
            return httpx.Response(301, headers={"Location": "/a.png"})
        return await png_reply(request)

    dns = {
        "media.example": [PUBLIC],
        "internal.example": [PUBLIC],
        # DNS rebinding: public when checked first, loopback on the next lookup
        "rebind.example": [[PUBLIC], ["127.0.0.1"]],
    }
    sites = {
        "media.example": to_other_host,
        "internal.example": png_reply,
        "rebind.example": to_same_host,
        "same.example": to_same_host,
    }
    net = FakeInternet(monkeypatch, {**dns, "same.example": [PUBLIC]}, sites)
    fetcher = net.fetcher(["media.example", "rebind.example", "same.example"])
    error = fetch(fetcher, "http://media.example/a.png")
    assert error.status == 400 and "'internal.example' is not in the allowed list" in error.message
    assert [r.headers["host"] for r in net.requests] == ["media.example"]  # never contacted
    assert fetch(fetcher, "http://same.example/moved") == make_png()  # same allowed host: fine
    net.requests.clear()
    error = fetch(fetcher, "http://rebind.example/moved")
    assert error.status == 400 and "non-public" in error.message
    assert len(net.requests) == 1  # the hop to the rebound address never happened

    async def loop_forever(request):
        return httpx.Response(302, headers={"Location": "/again"})

    net.sites["same.example"] = loop_forever
    error = fetch(fetcher, "http://same.example/again")
    assert error.status == 400 and "too many redirects" in error.message


def test_remote_fetch_size_and_time_limits(monkeypatch):
    async def huge(request):
        return httpx.Response(200, content=b"\0" * (2 * MB))

    class Drip(httpx.AsyncByteStream):
        sent = 0

        async def __aiter__(self):
            for _ in range(1000):  # one byte every 50 ms: each read is quick, the whole is not
                await asyncio.sleep(0.05)
                Drip.sent += 1
                yield b"x"

    async def drip(request):
        return httpx.Response(200, stream=Drip())

    sites = {"big.example": huge, "slow.example": drip}
    net = FakeInternet(monkeypatch, {"big.example": [PUBLIC], "slow.example": [PUBLIC]}, sites)
    error = fetch(net.fetcher(["big.example"], max_bytes=MB), "http://big.example/a")
    assert error.status == 413
    error = fetch(net.fetcher(["slow.example"], timeout=0.5), "http://slow.example/a")
    assert error.status == 400 and "longer than 0.5 s" in error.message
    assert Drip.sent < 1000  # the fetch gave up on the drip before its end

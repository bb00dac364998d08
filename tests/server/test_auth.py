"""Auth and CORS: keys from flags, files and the environment; 401 before the body is read."""

from __future__ import annotations

import socket

import httpx

from tests.server.reliability import (
    MB,
    assert_error,
)
from tests.servers import InProcessServer
from xllm.server.settings import Settings


def test_api_keys_from_env_and_file_guard_chat_and_v1_before_the_body_is_read(
    tiny_model, tmp_path, monkeypatch
):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n")
    monkeypatch.setenv("XLLM_API_KEY", "env-key")
    settings = Settings()  # as `xllm serve` builds it: XLLM_API_KEY from the environment
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "env-key"
    with InProcessServer(
        tiny_model, api_key=settings.api_key, api_key_file=keys, max_model_len=64
    ) as server:
        url = server.url
        hi = {"prompt": "hi", "max_tokens": "2"}
        chat_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic env-key"},
            {"Authorization": "Bearer"},
            {"Authorization": "env-key"},
            {"Authorization": "Bearer env-key-and-more"},
        ):
            r = httpx.post(f"{url}/chat", data=hi, headers=headers)
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(
                httpx.post(f"{url}/v1/chat/completions", json=chat_body, headers=headers), 401
            )
            assert_error(httpx.get(f"{url}/v1/models", headers=headers), 401)
        for key in ("env-key", "file-key"):
            auth = {"Authorization": f"Bearer {key}"}
            assert httpx.post(f"{url}/chat", data=hi, headers=auth).status_code == 200
            assert (
                httpx.post(f"{url}/v1/chat/completions", json=chat_body, headers=auth).status_code
                == 200
            )
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200
        # CORS is off without --cors-origins: no Access-Control-* header, preflight not answered.
        origin = {"Origin": "https://evil.example"}
        r = httpx.get(f"{url}/health", headers=origin)
        assert not any(h.startswith("access-control-") for h in r.headers)
        preflight = {**origin, "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{url}/chat", headers=preflight)
        assert "access-control-allow-origin" not in r.headers

        # 401 at the headers: 40 MB announced (under the upload limit), 1 KB sent, and the answer
        # comes without the server waiting for (or parsing) the rest of the body.
        # The proof is the answer itself: the rest of the body never arrives (the socket's
        # timeout only bounds a hang).
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(
                b"POST /chat HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                + f"Content-Length: {40 * MB}\r\n\r\n".encode()
                + b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
                + b"\0" * 1024
            )
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


def test_cors_only_for_the_listed_origins(tiny_model):
    with InProcessServer(
        tiny_model, cors_origins="https://app.example", api_key="k", max_model_len=64
    ) as server:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        ok = httpx.options(
            f"{server.url}/chat", headers={"Origin": "https://app.example", **preflight}
        )
        assert ok.status_code == 200  # preflights carry no key and still pass
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = httpx.options(
            f"{server.url}/chat", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in bad.headers
        # A 401 still carries CORS headers, so the page can read why it was refused.
        r = httpx.post(
            f"{server.url}/chat", data={"prompt": "hi"}, headers={"Origin": "https://app.example"}
        )
        assert_error(r, 401)
        assert r.headers["access-control-allow-origin"] == "https://app.example"

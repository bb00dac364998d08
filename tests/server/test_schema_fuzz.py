"""Fuzzing the HTTP contract: schemathesis against openapi.yaml, hand-made malformed requests,
and byte-level mutations of real media files through the decoders. None may give a 5xx.

The server is the real app under uvicorn in a thread on a loopback port (see
tests/servers.py InProcessServer), with a small context so that any generated max_tokens ends
quickly. Every case is bounded in time and count.
"""

from __future__ import annotations

import io
import random
import socket
from pathlib import Path

import httpx
import pytest

from tests.media import make_mp4, make_png, make_wav
from tests.server.reliability import assert_error
from tests.servers import InProcessServer

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 40  # per operation: with negative and coverage cases ~600 requests, ~25 s


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    with InProcessServer(
        tiny_model,
        max_batch=4,
        max_queue=64,
        max_model_len=64,
        default_max_tokens=8,
        request_timeout=15,
        max_upload_mb=2,
        max_media_per_request=4,
    ) as server:
        yield server


try:
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
except ImportError:  # the test extra brings it

    @pytest.mark.skip(reason="schemathesis is not installed: pip install -e '.[test]'")
    def test_schemathesis_finds_no_server_error():
        pass

else:
    SCHEMA = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
    SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])

    @SCHEMA.parametrize()
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure here is reproducible
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def test_schemathesis_finds_no_server_error(case, fuzz_server):
        response = case.call(base_url=fuzz_server.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, response.text[:500]


def test_the_server_survived_the_fuzzing(fuzz_server):
    r = httpx.post(f"{fuzz_server.url}/chat", data={"prompt": "still there?", "max_tokens": "2"})
    assert r.status_code == 200
    assert httpx.get(f"{fuzz_server.url}/ready").status_code == 200
    assert fuzz_server.engine.alive


# --- edge values of every sampling field ---------------------------------------------------------
EDGE_FORM_VALUES = [
    {"seed": str(2**64)},
    {"seed": str(-(2**63) - 1)},
    {"seed": "-1"},
    {"temperature": "1e-320"},
    {"temperature": "nan"},
    {"temperature": "inf"},
    {"temperature": "1e308"},
    {"temperature": "1", "repetition_penalty": "1e-300"},
    {"temperature": "1", "repetition_penalty": "1e308"},
    {"temperature": "1", "top_p": "1e-300"},
    {"top_k": str(2**64)},
    {"max_tokens": str(2**64)},
    {"min_tokens": str(2**64)},
    {"max_tokens": "0"},
    {"stop": ""},
    {"stop": "[]"},
    {"stop": '[""]'},
    {"stop": "[1, 2]"},
    {"stop": "[" * 10_000},
    {"ignore_eos": "maybe"},
    {"stream": "perhaps"},
    {"messages": "[" * 100_000},
    {"messages": '[{"role": "user", "content": "\\ud800"}]'},
    {"prompt": "\0\ufffe\U0010ffff" * 10},
]


@pytest.mark.parametrize("fields", EDGE_FORM_VALUES, ids=lambda f: ",".join(f)[:40])
def test_edge_values_are_answered_below_500(fuzz_server, fields):
    data = {"max_tokens": "3", **fields}
    if "messages" not in data:
        data.setdefault("prompt", "hi")
    r = httpx.post(f"{fuzz_server.url}/chat", data=data, timeout=30)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert_error(r, r.status_code)
    assert fuzz_server.engine.alive


EDGE_JSON_BODIES = [
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-320}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": '
    b'{"url": "data:,"}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": '
    b'{"data": "", "format": "wav"}}]}]}',
    b"\xff\xfe\x00garbage",
    b"",
    b"null",
    b"[]",
]


@pytest.mark.parametrize("body", EDGE_JSON_BODIES, ids=lambda b: repr(b[:40]))
def test_malformed_json_bodies_are_answered_below_500(fuzz_server, body):
    r = httpx.post(
        f"{fuzz_server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert_error(r, r.status_code)


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\nContent-Length: 4\r\n"
    b"\r\nabcd",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
    b"Content-Length: 20\r\n\r\n--zz\r\nno headers here\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 11\r\n\r\nprompt=%ZZ%",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED_HTTP, ids=lambda b: repr(b[:30]))
def test_malformed_http_is_refused_below_500(fuzz_server, request_bytes):
    reply = raw_exchange(fuzz_server.port, request_bytes)
    if reply:  # closing the connection without a word is also a fair answer to garbage
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply[:300]


def test_too_many_parts_and_fields_are_refused_below_500(fuzz_server):
    url = f"{fuzz_server.url}/chat"
    files = [("image", (f"{i}.png", b"x", "image/png")) for i in range(1500)]
    r = httpx.post(url, data={"prompt": "hi"}, files=files, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    fields = "&".join(f"f{i}=x" for i in range(5000))
    r = httpx.post(
        url,
        content=f"prompt=hi&{fields}",
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert r.status_code < 500, r.text


# --- byte-level fuzzing of the media decoders ----------------------------------------------------
def _seeds() -> dict[str, tuple[bytes, str]]:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    jpeg, gif, flac = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(jpeg, "JPEG")
    Image.new("P", (40, 30)).save(gif, "GIF")
    sf.write(flac, np.zeros(8000, np.float32), 16000, format="FLAC")
    return {
        "png": (make_png(), "image"),
        "jpeg": (jpeg.getvalue(), "image"),
        "gif": (gif.getvalue(), "image"),
        "wav": (make_wav(0.5), "audio"),
        "flac": (flac.getvalue(), "audio"),
        "mp4": (make_mp4(frames=4, fps=4), "video"),
        "mp4+aac": (make_mp4(frames=4, fps=4, audio=True), "audio"),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op, at = rng.random(), rng.randrange(len(out) or 1)
        if op < 0.5 and out:
            out[at] = rng.randrange(256)
        elif op < 0.7:
            del out[at : at + rng.randint(1, 64)]
        elif op < 0.85:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        else:  # a size or count field turned extreme
            out[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff"])
    return bytes(out)


RUNS = 400


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # then refused: 413
def test_mutated_media_only_ever_raise_media_errors():
    from xllm.model.media import MediaError, MediaLimits, decode_audio, decode_image, decode_video

    decoders = {"image": decode_image, "audio": decode_audio, "video": decode_video}
    limits = MediaLimits(max_image_pixels=4_000_000, max_audio_seconds=30, max_video_seconds=30)
    rng = random.Random(20240607)
    seeds = _seeds()
    statuses: dict[int | str, int] = {}
    for _ in range(RUNS):  # a fixed, seeded set of inputs: the same work on any machine
        name = rng.choice(sorted(seeds))
        data, kind = seeds[name]
        mutated = mutate(data, rng)
        try:
            decoders[kind](mutated, limits)
            statuses["ok"] = statuses.get("ok", 0) + 1
        except MediaError as exc:
            assert exc.status in (400, 413, 415), (name, exc.status, exc.message)
            assert exc.message
            statuses[exc.status] = statuses.get(exc.status, 0) + 1
        # anything else propagates and fails the test, with the input's recipe in the seed
    assert statuses.get(400), statuses

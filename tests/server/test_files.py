"""Media handles (/v1/files, OpenAI's Files API) through the official `openai` client against
real servers: an image uploaded once answers exactly like the same image inline, in chat
completions (file part) and /chat (file_id); deleted, over quota, another key's: clear 4xx."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from tests.media import make_png, make_wav
from tests.servers import InProcessServer, wait_until
from xllm.server.files import FileLimits, FileStore

RED = make_png(color=(200, 30, 30))
GREEDY = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this? "}, *parts]}]


def inline(png: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def handle(file_id: str) -> dict:
    return {"type": "file", "file": {"file_id": file_id}}


def test_an_uploaded_image_answers_like_the_same_image_inline(server):
    client = client_for(server.url)
    uploaded = client.files.create(file=("red.png", RED, "image/png"), purpose="vision")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(RED), "red.png", "vision")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert uploaded.id in [f.id for f in client.files.list().data]

    by_handle = client.chat.completions.create(
        model="m", messages=user(handle(uploaded.id)), **GREEDY
    )
    by_bytes = client.chat.completions.create(model="m", messages=user(inline(RED)), **GREEDY)
    assert by_handle.choices[0].message.content == by_bytes.choices[0].message.content
    assert by_handle.usage.prompt_tokens_details.image_tokens == 8

    # /chat: a file_id binds like an uploaded file of its kind; a wav handle goes with audio
    wav = client.files.create(file=("tone.wav", make_wav(1.0), "audio/wav"), purpose="user_data")
    form = {"prompt": "Compare <image> with <audio>", "max_tokens": "6", "temperature": "0"}
    uploads = {"image": RED, "audio": make_wav(1.0)}
    expected = httpx.post(f"{server.url}/chat", data=form, files=uploads, timeout=60)
    replies = [
        httpx.post(
            f"{server.url}/chat", data={**form, "file_id": [wav.id, uploaded.id]}, timeout=60
        ),
        httpx.post(
            f"{server.url}/chat",
            data={**form, "file_id": wav.id},
            files={"image": RED},
            timeout=60,
        ),
    ]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] == expected.json()["text"]

    # Handles do not count against --max-media-per-request (4 on this server): decoded at upload
    many = [handle(uploaded.id)] * 5
    reply = client.chat.completions.create(model="m", messages=user(*many), **GREEDY)
    assert reply.usage.prompt_tokens_details.image_tokens == 5 * 8
    with pytest.raises(openai.APIStatusError, match="max-media-per-request"):
        client.chat.completions.create(model="m", messages=user(*[inline(RED)] * 5), **GREEDY)

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError, match=uploaded.id):
        client.chat.completions.create(model="m", messages=user(handle(uploaded.id)), **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    gone = httpx.post(f"{server.url}/chat", data={**form, "file_id": uploaded.id}, timeout=60)
    assert gone.status_code == 404 and uploaded.id in gone.json()["error"]["message"]
    client.files.delete(wav.id)


def test_what_is_not_media_is_refused_at_upload(server):
    client = client_for(server.url)
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("notes.txt", b"just some text", "text/plain"), purpose="vision")
    assert refused.value.status_code == 415
    broken = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # a PNG signature, then garbage
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("broken.png", broken, "image/png"), purpose="vision")


def test_handles_belong_to_their_key_and_keep_to_its_quota(tiny_model, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-a\nkey-b\n")
    small = len(RED) * 2 / 2**20  # MB: room for two such images
    with InProcessServer(
        tiny_model, api_key_file=keys, files_max_count=2, files_max_mb=small
    ) as server:
        a, b = client_for(server.url, "key-a"), client_for(server.url, "key-b")
        mine = a.files.create(file=("red.png", RED, "image/png"), purpose="vision")
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.chat.completions.create(model="m", messages=user(handle(mine.id)), **GREEDY)
        assert b.files.list().data == [] and [f.id for f in a.files.list().data] == [mine.id]
        other = httpx.post(
            f"{server.url}/chat",
            data={"prompt": "hi", "file_id": mine.id},
            headers={"Authorization": "Bearer key-b"},
        )
        assert other.status_code == 404

        a.files.create(file=("red2.png", RED, "image/png"), purpose="vision")
        with pytest.raises(openai.RateLimitError, match="quota") as over:
            a.files.create(file=("red3.png", RED, "image/png"), purpose="vision")
        assert json.loads(over.value.response.text)["error"]["type"] == "insufficient_quota"
        b.files.create(file=("red.png", RED, "image/png"), purpose="vision")  # b's own quota
        big = make_png(size=(400, 300))
        assert len(big) > len(RED)
        b.files.create(file=("red.png", RED, "image/png"), purpose="vision")
        a.files.delete(mine.id)  # room for one more file, not for more bytes than the quota
        with pytest.raises(openai.RateLimitError, match="bytes"):
            a.files.create(file=("big.png", big + big, "image/png"), purpose="vision")


def test_handles_expire_and_a_directory_keeps_them_across_restarts(tmp_path):
    now = [1000.0]
    limits = FileLimits(ttl=60, max_files=10, max_bytes=2**20, directory=tmp_path / "files")
    store = FileStore(limits, clock=lambda: now[0])
    kept = store.add("owner", "a.png", "vision", "image", RED, prepared=None)  # type: ignore[arg-type]
    short = store.add("owner", "b.png", "vision", "image", RED, prepared=None)  # type: ignore[arg-type]
    store.delete("owner", short.id)
    assert sorted(p.name for p in limits.directory.iterdir()) == [kept.id, f"{kept.id}.json"]

    restarted = FileStore(limits, clock=lambda: now[0])  # a new process on the same directory
    again = restarted.get("owner", kept.id)
    assert (again.filename, again.kind, again.prepared) == ("a.png", "image", None)
    assert restarted.data(again) == RED  # decoded again at its first use
    with pytest.raises(Exception, match="no file"):
        restarted.get("someone else", kept.id)
    for name in ("../files", "file-../../etc/passwd", f"{kept.id}.json"):
        with pytest.raises(Exception, match="no file"):
            restarted.get("owner", name)

    # Two servers sharing the directory serve each other's handles, and see their deletions.
    other = restarted.add("owner", "c.png", "vision", "image", RED, prepared=None)  # type: ignore[arg-type]
    assert store.get("owner", other.id).filename == "c.png"
    assert {f.id for f in store.list("owner")} == {kept.id, other.id}
    restarted.delete("owner", other.id)
    with pytest.raises(Exception, match="no file"):
        store.get("owner", other.id)
    assert [f.id for f in store.list("owner")] == [kept.id]

    now[0] += 61  # its time is up
    with pytest.raises(Exception, match="no file"):
        restarted.get("owner", kept.id)
    assert list(limits.directory.iterdir()) == []
    memory = FileStore(FileLimits(ttl=None), clock=lambda: now[0])
    forever = memory.add("o", "a.png", "vision", "image", RED, prepared=None)  # type: ignore[arg-type]
    now[0] += 10**9
    assert memory.get("o", forever.id).data == RED


def test_a_handles_encoding_is_kept_while_it_lives(tiny_model):
    """With no encoder cache at all (--encoder-cache-mb 0) a handle's media are still encoded
    once: the engine keeps its encoder output pinned until the handle is deleted."""
    with InProcessServer(tiny_model, encoder_cache_mb=0) as server:
        client = client_for(server.url)
        cache = server.engine.runner.encoder_cache
        uploaded = client.files.create(file=("red.png", RED, "image/png"), purpose="vision")
        replies = [
            client.chat.completions.create(model="m", messages=user(handle(uploaded.id)), **GREEDY)
            for _ in range(2)
        ]
        assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
        assert len(cache.pinned) == 1 and cache.hits == 1  # the second request's encoding
        client.chat.completions.create(model="m", messages=user(inline(RED)), **GREEDY)
        assert cache.hits == 2  # the same content inline finds it too
        client.files.delete(uploaded.id)
        wait_until(lambda: not cache.pinned, 30, "the engine to unpin the deleted handle's media")
        assert len(cache) == 0  # back into an LRU that holds nothing

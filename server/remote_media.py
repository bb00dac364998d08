"""Fetching http(s) media URLs: only from hosts the operator allowed, never private addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from xllm.server.errors import ServingError

MAX_REDIRECTS = 3


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class RemoteMediaFetcher:
    def __init__(self, allowed_hosts: list[str], max_bytes: int, timeout: float = 10.0) -> None:
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def _check(self, url: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https"):
            raise ServingError(f"media URL scheme '{parts.scheme}' is not allowed", 400)
        if not self.allowed_hosts:
            raise ServingError(
                "remote media URLs are disabled on this server; send a data URI "
                "(the operator can allow hosts with --allow-remote-media)",
                400,
            )
        if host not in self.allowed_hosts:
            raise ServingError(f"media host '{host}' is not in the allowed list", 400)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443)
        except socket.gaierror:
            raise ServingError(f"media host '{host}' does not resolve", 400) from None
        for info in infos:
            address = str(info[4][0])
            if not _public(address):
                raise ServingError(f"media host '{host}' resolves to a non-public address", 400)

    async def fetch(self, url: str) -> bytes:
        """Body of url, following at most a few redirects, each checked like the first."""
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                await self._check(url)
                try:
                    async with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise ServingError(
                                f"fetching media gave HTTP {response.status_code}", 400
                            )
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > self.max_bytes:
                                raise ServingError(
                                    "remote media is larger than the upload limit", 413
                                )
                        return bytes(body)
                except httpx.HTTPError as exc:
                    raise ServingError(
                        f"fetching media failed: {type(exc).__name__}", 400
                    ) from None
        raise ServingError("too many redirects fetching media", 400)

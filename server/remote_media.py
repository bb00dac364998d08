"""Media given by URL: base64 data URIs decoded, http(s) URLs fetched only from hosts the operator
allowed, never from private addresses.

Every hop (the URL and each redirect) is checked: scheme, host on the allow-list, and every
address the host resolves to public. The connection then goes to the address that was checked,
not to a second lookup of the name (which a rebinding DNS server could point at 127.0.0.1);
the Host header and TLS SNI / certificate check still use the name. Bodies are capped at the
upload limit, and the whole fetch, redirects included, at `timeout` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from xllm.server.errors import ServingError

MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def decode_base64(payload: str, what: str) -> bytes:
    """Base64 text -> its bytes; a 400 naming `what` when it is not valid base64."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServingError(f"{what} is not valid base64", 400) from None


def data_uri_bytes(url: str, kind: str) -> bytes:
    """The bytes of a `data:<type>;base64,...` URI given for `kind` media."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ServingError(f"{kind} data URI must be base64 ('data:<type>;base64,...')", 400)
    return decode_base64(payload, f"{kind} data URI")


def _public(address: str) -> bool:
    """True only for globally routable unicast addresses (IPv4 inside IPv6 judged as IPv4)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
        address.split("%", 1)[0]  # an IPv6 zone id ("fe80::1%eth0") is not part of the address
    )
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        else:
            ip = ip.ipv4_mapped or ip.sixtofour or ip
    # is_global is False for private, loopback, link-local, shared (100.64/10), reserved,
    # documentation and unspecified ranges; some multicast ranges count as global.
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (tests replace this to simulate DNS)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class RemoteMediaFetcher:
    def __init__(
        self,
        allowed_hosts: list[str],
        max_bytes: int,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.transport = transport

    async def _check(self, url: str) -> str:
        """Check one hop; return the vetted address to connect to."""
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
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = await resolve(host, port)
        except (socket.gaierror, UnicodeError, ValueError):
            raise ServingError(f"media host '{host}' does not resolve", 400) from None
        if not addresses:
            raise ServingError(f"media host '{host}' does not resolve", 400)
        for address in addresses:
            if not _public(address):
                raise ServingError(f"media host '{host}' resolves to a non-public address", 400)
        return addresses[0]

    async def fetch(self, url: str) -> bytes:
        """Body of url, following at most a few redirects, each checked like the first."""
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout)
        except TimeoutError:
            raise ServingError(f"fetching media took longer than {self.timeout:g} s", 400) from None

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, transport=self.transport, trust_env=False
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                address = await self._check(url)
                parts = urlsplit(url)
                host = parts.hostname or ""
                pinned = f"[{address}]" if ":" in address else address
                if parts.port:
                    pinned += f":{parts.port}"
                target = urlunsplit((parts.scheme, pinned, parts.path, parts.query, ""))
                # No compression: the size cap then counts the bytes that arrive.
                headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept-Encoding": "identity"}
                extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
                try:
                    async with client.stream(
                        "GET", target, headers=headers, extensions=extensions
                    ) as response:
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

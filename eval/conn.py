"""A small asyncio HTTP/1.1 client for the generated clients: one
keep-alive connection per simulated client, every request labelled.

What a client sees is only used to drive it (a token, a status); the
metrics come from Envoy's access log."""

from __future__ import annotations

import asyncio
import json
import re

from bootstrap import LABEL_HEADER

TIMEOUT_S = 15


class Reply:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return {}

    @property
    def blocked(self) -> bool:
        """What the client can tell: a filter reply (the access log decides)."""
        return self.status in (403, 429) and "retry-after" in self.headers


class Client:
    """One simulated client: its label (`scenario/client-id`), its address
    (X-Forwarded-For) and its own header set in a fixed order."""

    def __init__(self, port: int, scenario: str, client_id: str, address: str, headers: list[tuple[str, str]]):
        self.port = port
        self.label = f"{scenario}/{client_id}"
        self.address = address
        self.headers = headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0
        self.errors = 0

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body=None, headers: list[tuple[str, str]] | None = None,
                      address: str | None = None) -> Reply | None:
        """Sends one request (None when the connection failed; counted)."""
        payload = b""
        extra = list(headers or [])
        if isinstance(body, (dict, list)):
            payload = json.dumps(body).encode()
            extra.append(("content-type", "application/json"))
        elif isinstance(body, str):
            payload = body.encode()
            extra.append(("content-type", "application/x-www-form-urlencoded"))
        lines = [f"{method} {path} HTTP/1.1", "host: api.example.com"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        lines += [f"{k}: {v}" for k, v in extra]
        lines += [f"x-forwarded-for: {address or self.address}", f"{LABEL_HEADER}: {self.label}"]
        if payload or method in ("POST", "PUT"):
            lines.append(f"content-length: {len(payload)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        for attempt in range(2):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.port), TIMEOUT_S)
                self.writer.write(raw)
                reply = await asyncio.wait_for(self._read(), TIMEOUT_S)
                self.sent += 1
                if reply.headers.get("connection", "").lower() == "close":
                    await self.close()
                return reply
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                await self.close()
                if attempt == 1:
                    self.errors += 1
        return None

    async def _read(self) -> Reply:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self.reader.readline()
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readline()
        else:
            body = b""
        return Reply(status, headers, body)


def uid_of(username: str) -> int:
    m = re.fullmatch(r"user(\d{4})", username)
    return int(m.group(1)) if m else 0

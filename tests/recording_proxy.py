"""A small TCP proxy on 127.0.0.1 that records the bytes a client sends upstream.

Used by the raw-data test: a site's SuperNode connects to the proxy instead of the
SuperLink, so everything the site sends passes through :class:`RecordingProxy`. The proxy
runs its own asyncio loop in a daemon thread, records at most ``max_bytes`` per direction,
and stops by itself after ``lifetime`` seconds (or on :meth:`stop`).

:func:`http_bodies` turns a recorded plaintext HTTP/1.1 stream (Flower 1.41's Fleet API is
protobuf over HTTP) into the request bodies it carried, chunked and compressed bodies
included, so a byte pattern split by the framing is still found.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import threading
import zlib
from dataclasses import dataclass, field

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Connection:
    """The bytes of one proxied connection, per direction."""

    upstream: bytearray = field(default_factory=bytearray)
    downstream: bytearray = field(default_factory=bytearray)


class RecordingProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` and record the traffic.

    Parameters
    ----------
    target_port : int
        Port of the real server (the SuperLink) on 127.0.0.1.
    max_bytes : int
        Bytes recorded per direction over all connections; traffic beyond it is still
        forwarded, and :attr:`truncated` becomes true.
    lifetime : float
        Seconds after which the proxy closes every connection and stops by itself.
    """

    def __init__(self, target_port: int, max_bytes: int = 64 << 20, lifetime: float = 300.0):
        self.target_port = target_port
        self.max_bytes = max_bytes
        self.lifetime = lifetime
        self.connections: list[Connection] = []
        self.truncated = False
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._recorded = {"upstream": 0, "downstream": 0}

    def start(self) -> int:
        """Start listening; returns the proxy's port."""
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("the recording proxy did not start")
        return self.port

    def stop(self) -> None:
        """Close every connection and the listener; wait for the thread to end."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def upstream(self) -> list[bytes]:
        """What clients sent, one bytes object per connection."""
        return [bytes(c.upstream) for c in self.connections]

    def downstream(self) -> list[bytes]:
        """What the server sent back, one bytes object per connection."""
        return [bytes(c.downstream) for c in self.connections]

    # --- the event loop -----------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            tasks.add(task)
            try:
                await self._serve(reader, writer)
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.lifetime)
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection()
        self.connections.append(conn)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, conn.upstream, "upstream")),
            asyncio.create_task(self._pump(up_reader, writer, conn.downstream, "downstream")),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: bytearray,
        direction: str,
    ) -> None:
        while chunk := await reader.read(65536):
            room = self.max_bytes - self._recorded[direction]
            if room < len(chunk):
                self.truncated = True
            record += chunk[: max(room, 0)]
            self._recorded[direction] += min(len(chunk), max(room, 0))
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


def http_bodies(stream: bytes) -> list[bytes]:
    """The bodies of the HTTP/1.1 messages in one direction of a plaintext connection.

    Flower 1.41's Fleet API is protobuf over HTTP (httpx); each request's body is one
    serialised protobuf message. ``Content-Length`` and chunked bodies are read, gzip and
    deflate content encodings undone; a trailing partial message is dropped.

    Raises
    ------
    ValueError
        If the stream is not HTTP/1.x (HTTP/2, TLS) or uses another content encoding.
    """
    if stream.startswith(H2_PREFACE) or stream[:1] == b"\x16":
        raise ValueError("the recorded stream is HTTP/2 or TLS, not plaintext HTTP/1.1")
    bodies, pos = [], 0
    while (end := stream.find(b"\r\n\r\n", pos)) >= 0:
        head = stream[pos:end].decode("latin-1").split("\r\n")
        if not head[0].endswith(("HTTP/1.1", "HTTP/1.0")) and not head[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP/1.x message: {head[0][:60]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        pos = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, pos = _dechunk(stream, pos)
        else:
            length = int(headers.get("content-length", "0"))
            body, pos = stream[pos : pos + length], pos + length
            if len(body) < length:
                break
        bodies.append(_decode(body, headers.get("content-encoding", "identity")))
    return bodies


def _dechunk(stream: bytes, pos: int) -> tuple[bytes, int]:
    body = bytearray()
    while (eol := stream.find(b"\r\n", pos)) >= 0:
        size = int(stream[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return bytes(body), stream.find(b"\r\n\r\n", pos - 2) + 4
        body += stream[pos : pos + size]
        pos += size + 2
    return bytes(body), len(stream)


def _decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"a recorded HTTP body uses content encoding {encoding!r}")

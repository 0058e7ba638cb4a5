"""A guard in front of Triton's HTTP endpoint: refuses the inference requests that crash it.

Triton 2.51's HTTP/JSON front end allocates ``element count x element size`` bytes for an input
carried as JSON ``data`` *before* it compares the count with the data it got: a request
declaring the shape ``[1, 2**62]`` dies of SIGSEGV, ``[1, 2**32]`` of ``bad_alloc``, and
``[1, 2**29]`` costs 4 GiB (docs/deployment.md, PLATFORM.md). One hostile client could then use
up ``hps serve``'s restarts. Binary-tensor HTTP and gRPC refuse the same shapes cleanly.

:class:`HttpGuard` listens where the user asked for Triton's HTTP endpoint and forwards every
request, byte for byte, to Triton's own HTTP port on loopback (health, metadata, repository,
shared memory, inference with JSON or binary tensors, error bodies: all of Triton's HTTP API,
headers such as ``hps-api-token`` included). Only the JSON inference header of a request whose
path holds ``/infer`` is read, never binary tensor bytes: the first
``Inference-Header-Content-Length`` bytes of the body, or the whole body without that header.
:func:`check_inference_header` applies the rules; a request that breaks one is answered
``400 {"error": "..."}`` (Triton's own error format) and never reaches Triton:

* every input's shape is a list of integers from 0 to 2**63-1;
* its byte size (element count x element size; 4 bytes at least per BYTES element) is at most
  ``max_input_bytes``;
* an input carried as JSON ``data`` (no ``binary_data_size`` nor ``shared_memory_region``
  parameter) has exactly as many elements in its data as its shape declares: Triton's own rule,
  checked here before Triton's parser allocates;
* an input with ``binary_data_size`` of a fixed-size type has exactly ``element count x element
  size`` bytes: Triton's own rule too;
* and what Triton's parser could read differently from Python's: duplicate keys in an object,
  a header that is not JSON, duplicate framing headers, a body encoding we cannot decode.

Design (measured on 2 cores, scripts/bench_http_guard.py): one thread per client connection,
blocking sockets, and one persistent upstream connection per client connection, opened at its
first request. Requests on a connection are forwarded one at a time: a request is read (its
JSON header parsed), sent, and its response relayed before the next request is read, so a
refusal is always answered in order, pipelined or not. Bodies and responses are streamed in
pieces of at most :data:`_CHUNK` bytes. ``Expect: 100-continue`` is answered by the guard (the
next hop gets the body at once, without the header).

The guard belongs to ``hps serve``, not to Triton: it outlives Triton's restarts. While Triton
is down (its port refuses connections, or the connection breaks before an answer), a request
gets ``503 {"error": ...}``; the next one connects again. ``hps serve``'s own calls (readiness,
liveness, model control) go to Triton's loopback port directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from hps_core.errors import RequestError, ServingError
from hps_core.logs import RateLimitedLog

__all__ = ["DEFAULT_MAX_INPUT_BYTES", "HttpGuard", "check_inference_header"]

log = logging.getLogger(__name__)

#: Largest byte size an input may declare. Triton 2.51 has no --http-max-input-size; 2 GiB is far
#: above what an HPS or DLRM request carries (1,024 samples x 26 keys x 8 bytes is 208 KiB) and
#: far below what crashes (Triton's JSON parser allocates the declared size: 4 GiB took 15 s).
DEFAULT_MAX_INPUT_BYTES = 2**31
#: Largest JSON inference header the guard reads (a JSON-only request is all header). Parsed,
#: JSON numbers cost ~25x their text in Python objects (64 MiB of floats took 1.6 GiB and 2.3 s):
#: 8 MiB holds a batch of 4,096 DLRM samples as JSON; real traffic sends binary tensors.
DEFAULT_MAX_HEADER_BYTES = 8 * 2**20
#: Headers above this size are parsed at most two at a time (the others wait), so a few clients
#: sending the largest ones cannot take hps serve's memory.
_LARGE_HEADER_BYTES = 2**20
_LARGE_PARSES = threading.BoundedSemaphore(2)
_MAX_HEAD_BYTES = 64 * 1024  # request line + headers; Triton's clients send a few hundred bytes
_MAX_CONNECTIONS = 1024  # client connections served at once (a thread each)
# A thread per connection makes idle connections the way to exhaust the guard: one kept open
# between requests is closed after this long (nginx's keepalive_timeout is 75 s; HTTP clients
# reconnect), and a request's head must be complete this long after its first byte came.
_IDLE_S = 75.0
_CHUNK = 256 * 1024  # most bytes read from or written to a socket at once while streaming
_INT64_MAX = 2**63 - 1
_LOG_EVERY_S = 10.0

# Triton's datatypes and their element sizes (BYTES: a 4-byte length prefix at least).
_ELEMENT_BYTES = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}
_BYTES_MIN = 4


# --------------------------------------------------------------------------- the rules
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Object hook: Triton's parser (rapidjson) takes the *first* of duplicate keys, Python's
    the last; a shape hidden behind a duplicate would pass here and crash there."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestError(f"duplicate key {key!r} in a JSON object of the inference header; send each key once")
        result[key] = value
    return result


def _leaf_count(data: Any) -> int:
    """Elements in JSON ``data``: Triton flattens nested arrays, a scalar counts one."""
    if not isinstance(data, list):
        return 1
    count, pending = 0, [data]
    while pending:
        for item in pending.pop():
            if isinstance(item, list):
                pending.append(item)
            else:
                count += 1
    return count


def check_inference_header(header: bytes, *, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> None:
    """Raise :class:`RequestError` when the JSON inference header ``header`` declares an input
    Triton 2.51's HTTP front end must not see (the rules are in the module docstring)."""
    try:
        with _LARGE_PARSES if len(header) > _LARGE_HEADER_BYTES else contextlib.nullcontext():
            request = json.loads(header, object_pairs_hook=_unique_keys)
    except RecursionError:  # arrays nested deeper than Python's stack: no tensor is
        raise RequestError("the inference header nests JSON arrays or objects too deeply; send flat data") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        if isinstance(exc, RequestError):
            raise
        raise RequestError(f"the inference header is not valid JSON ({exc}); send a JSON object") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        return  # not an inference request Triton can parse: it answers the error itself
    for entry in inputs:
        if isinstance(entry, dict):
            _check_input(entry, max_input_bytes)


def _check_input(entry: dict[str, Any], max_input_bytes: int) -> None:
    name = entry.get("name")
    shape = entry.get("shape")
    what = f"input {name!r}" if isinstance(name, str) else "an input without a name"
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d <= _INT64_MAX for d in shape  # type(): bool is an int in Python
    ):
        raise RequestError(
            f"{what} declares shape {_short(shape)}: a shape is a list of integers from 0 to 2**63-1; fix the shape"
        )
    count = 1
    for dim in shape:
        count *= dim  # Python's ints do not overflow: [2**32, 2**32] is 2**64, not 0
    datatype = entry.get("datatype")
    size = _ELEMENT_BYTES.get(datatype, _BYTES_MIN) if isinstance(datatype, str) else _BYTES_MIN
    if count * size > max_input_bytes:
        raise RequestError(
            f"{what} declares shape {shape}: {count} elements of {datatype} are {count * size} bytes, above "
            f"this server's limit of {max_input_bytes} bytes per input (hps serve's HTTP guard; Triton's JSON "
            f"parser would allocate them); send a smaller tensor"
        )
    parameters = entry.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    if "shared_memory_region" in parameters:
        return  # the bytes are in a registered region: Triton checks its size
    if "binary_data_size" in parameters:
        declared = parameters["binary_data_size"]
        expected = count * size
        if datatype in _ELEMENT_BYTES and declared != expected:
            raise RequestError(
                f"{what} declares shape {shape} of {datatype} ({expected} bytes) but binary_data_size "
                f"{_short(declared)}; send binary_data_size equal to the tensor's bytes"
            )
        return
    carried = _leaf_count(entry.get("data", []))
    if carried != count:
        raise RequestError(
            f"{what} declares shape {shape} ({count} elements) but its JSON data holds {carried}; "
            f"the shape must match the data (or send the tensor as binary data)"
        )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


# --------------------------------------------------------------------------- HTTP framing
class _Closed(Exception):
    """The peer closed its connection (or it broke)."""


class _BadRequest(Exception):
    """A request the guard cannot frame or inspect: answered with ``status`` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Reader:
    """Buffered reads from a blocking socket."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(_CHUNK)
        except OSError as exc:
            raise _Closed(str(exc)) from exc
        if not data:
            raise _Closed("connection closed")
        self.buf += data

    def until(self, delimiter: bytes, limit: int, within_s: float | None = None) -> bytes:
        """Bytes up to and including ``delimiter``; :class:`_BadRequest` past ``limit``,
        :class:`_Closed` when they took more than ``within_s`` from the first byte."""
        start = 0
        deadline = None
        while (end := self.buf.find(delimiter, start)) < 0:
            if len(self.buf) > limit:
                raise _BadRequest(f"request head longer than {limit} bytes", 431)
            if within_s is not None and self.buf:
                deadline = deadline or time.monotonic() + within_s
                if time.monotonic() > deadline:
                    raise _Closed(f"request head not complete {within_s:.0f} s after its first byte")
            start = max(0, len(self.buf) - len(delimiter) + 1)
            self._fill()
        end += len(delimiter)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes: the buffer's first, else one recv."""
        if not self.buf:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


class _Message:
    """One parsed HTTP head: the start line, the raw head, the headers that frame the body."""

    __slots__ = ("head", "start", "headers")

    def __init__(self, head: bytes) -> None:
        self.head = head
        lines = head[:-4].split(b"\r\n")
        self.start = lines[0]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(f"malformed header line {line[:100]!r}")
            key = name.lower()
            value = value.strip()
            if key in headers:
                if key in _SINGLE_HEADERS:
                    raise _BadRequest(f"header {name.decode(errors='replace')} given twice; send it once")
                headers[key] += b", " + value
            else:
                headers[key] = value
        self.headers = headers

    def framing(self) -> tuple[str, int]:
        """("length", n), ("chunked", 0), or ("none", 0) for the body that follows."""
        encoding = self.headers.get(b"transfer-encoding")
        if encoding is not None:
            if b"content-length" in self.headers:
                raise _BadRequest("both Transfer-Encoding and Content-Length given; send one")
            if encoding.lower() != b"chunked":
                raise _BadRequest(f"Transfer-Encoding {encoding!r} is not supported; send chunked or Content-Length")
            return "chunked", 0
        length = self.headers.get(b"content-length")
        if length is None:
            return "none", 0
        if not length.isdigit():
            raise _BadRequest(f"Content-Length {length[:40]!r} is not a number")
        return "length", int(length)

    def wants_close(self, version: bytes) -> bool:
        connection = self.headers.get(b"connection", b"").lower()
        if version == b"HTTP/1.0":
            return b"keep-alive" not in connection
        return b"close" in connection


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Headers whose duplicates Triton's server and ours could read differently (request smuggling).
_SINGLE_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"inference-header-content-length",
                             b"content-encoding"})


class _Body:
    """The body of one message on ``reader``: its raw bytes (as sent) are kept in ``raw`` until
    forwarded; ``payload(n)`` decodes (chunked) the first ``n`` payload bytes for inspection."""

    def __init__(self, reader: _Reader, kind: str, length: int, *, keep: bool = True) -> None:
        self.reader = reader
        self.kind = kind  # "length", "chunked", "until_close" (a response without framing), "none"
        self.left = length  # "length": raw bytes still unread; "chunked": of the current chunk and its CRLF
        self.done = kind == "none" or (kind == "length" and length == 0)
        self.raw: list[bytes] = []
        self.keep = keep  # whether payload is collected in `decoded` (only while inspecting)
        self.decoded = bytearray()
        self.broken = False  # its framing failed: where the next message begins is unknown

    def _read_piece(self) -> bytes:
        """The next raw piece of the body (empty once done), its payload added to ``decoded``
        while ``keep``."""
        if self.done:
            return b""
        if self.kind == "length":
            data = self.reader.some(min(self.left, _CHUNK))
            self.left -= len(data)
            self.done = self.left == 0
            if self.keep:
                self.decoded += data
            return data
        if self.kind == "until_close":
            try:
                return self.reader.some(_CHUNK)
            except _Closed:
                self.done = True
                return b""
        # chunked: "<size>[;ext]\r\n<data>\r\n" ... "0\r\n<trailers>\r\n"
        if self.left == 0:
            line = self.reader.until(b"\r\n", 4096)
            size_text = line.split(b";", 1)[0].strip()
            # Hex digits only: int(.., 16) also takes "-5" (a negative size spun this loop
            # forever), "+5", "0x10" and "1_0", which Triton's parser would read otherwise.
            if not _CHUNK_SIZE.fullmatch(size_text):
                self.broken = True
                raise _BadRequest(f"malformed chunk size {size_text[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                trailers = line
                while (trailer := self.reader.until(b"\r\n", _MAX_HEAD_BYTES)) != b"\r\n":
                    trailers += trailer
                self.done = True
                return trailers + b"\r\n"
            self.left = size + 2  # the data and its CRLF
            return line
        before = self.left
        data = self.reader.some(min(self.left, _CHUNK))
        self.left -= len(data)
        if self.keep:  # without the bytes of the chunk's trailing CRLF
            crlf = max(0, 2 - self.left) - max(0, 2 - before)
            self.decoded += data[: len(data) - crlf]
        return data

    def payload(self, n: int, within_s: float) -> bytes:
        """The first ``n`` payload bytes (fewer when the body is shorter), reading as needed;
        :class:`_Closed` when they take longer than ``within_s`` (a client sending a byte a
        minute would hold its connection's thread for good)."""
        deadline = time.monotonic() + within_s
        while len(self.decoded) < n and not self.done:
            if time.monotonic() > deadline:
                raise _Closed(f"the inference header not complete {within_s:.0f} s after it began")
            self.raw.append(self._read_piece())
        return bytes(self.decoded[:n])

    def pieces(self) -> Iterator[bytes]:
        """Every raw piece: those read for inspection, then the rest as it comes (streamed)."""
        self.keep = False
        self.decoded = bytearray()
        yield from self.raw
        self.raw = []
        while not self.done:
            yield self._read_piece()

    def drain(self) -> None:
        for _ in self.pieces():
            pass


# --------------------------------------------------------------------------- the guard
class HttpGuard:
    """Forwards HTTP from ``host:port`` (0 picks a free port) to Triton at ``upstream()``.

    ``upstream`` returns Triton's HTTP ``host:port`` at the time of each new upstream
    connection: Triton may be restarted, its port picked after the guard started.
    """

    def __init__(
        self,
        host: str,
        port: int,
        upstream: Callable[[], str],
        *,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_connections: int = _MAX_CONNECTIONS,
        idle_s: float = _IDLE_S,
    ) -> None:
        self.upstream = upstream
        self.max_input_bytes = max_input_bytes
        self.max_header_bytes = max_header_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self.idle_s = idle_s
        self._client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise ServingError(f"HTTP guard: cannot listen on {host}:{port} ({exc.strerror}); "
                               f"pick a free --http-port (0: any) or another --http-host") from exc
        self._listener.listen(512)
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="hps-http-guard", daemon=True)
        self.refused = 0  # requests answered 400 by the rules
        self._refusals = RateLimitedLog(log, _LOG_EVERY_S)  # a flood of them must not flood the log

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``host:port`` where clients reach the guard (what tritonclient takes)."""
        return f"{self._client_host}:{self.port}"

    def __enter__(self) -> HttpGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, close every connection (their threads then end)."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(5)
        self._refusals.flush()  # the count of refusals held back since the last line

    def note_refusal(self, what: str) -> None:
        """Count a refused request; log it, at most one line per :data:`_LOG_EVERY_S`."""
        with self._lock:
            self.refused += 1
        self._refusals.warning("refused", f"HTTP guard refused {what}")

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue  # EMFILE, ECONNABORTED: the next accept may work
            if not self._slots.acquire(blocking=False):
                _answer(client, 503, f"the HTTP guard serves {self._max_connections} connections at most; "
                                     f"close idle ones or retry", close=True)
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), name="hps-http-guard-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._connections.add(client)
        connection = _Connection(self, client)
        try:
            connection.run()
        except Exception:  # a bug must cost one connection, never the guard
            log.exception("HTTP guard: connection failed")
        finally:
            connection.close()
            with self._lock:
                self._connections.discard(client)
            self._slots.release()


class _Connection:
    """One client connection and its upstream connection to Triton."""

    def __init__(self, guard: HttpGuard, client: socket.socket) -> None:
        self.guard = guard
        self.client = client
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(guard.idle_s)  # no byte for this long: the read raises, the connection ends
        self.reader = _Reader(client)
        self.up: socket.socket | None = None
        self.up_reader: _Reader | None = None

    def close(self) -> None:
        self._close_upstream()
        with contextlib.suppress(OSError):
            self.client.close()

    def _close_upstream(self) -> None:
        if self.up is not None:
            with contextlib.suppress(OSError):
                self.up.close()
        self.up = self.up_reader = None

    def run(self) -> None:
        while True:
            try:
                request = _Message(self.reader.until(b"\r\n\r\n", _MAX_HEAD_BYTES, self.guard.idle_s))
            except _Closed:
                return
            except _BadRequest as exc:
                _answer(self.client, exc.status, str(exc), close=True)
                return
            if not self._handle(request):
                return

    def _handle(self, request: _Message) -> bool:
        """Forward (or refuse) one request and relay its response; False to close the connection."""
        parts = request.start.split(b" ")
        if len(parts) != 3:
            _answer(self.client, 400, f"malformed request line {request.start[:100]!r}", close=True)
            return False
        method, target, version = parts
        close = request.wants_close(version)
        try:
            kind, length = request.framing()
        except _BadRequest as exc:
            return _answer(self.client, exc.status, str(exc), close=True)  # unframed: cannot go on
        body = _Body(self.reader, kind, length)
        try:
            head = request.head
            if request.headers.get(b"expect", b"").lower() == b"100-continue":
                # Answered here, so the body comes at once; Triton gets it without the header.
                self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                head = _without_header(head, b"expect")
            if not body.done and b"/infer" in urllib.parse.unquote_to_bytes(target):
                self._inspect(request, body)
        except _BadRequest as exc:
            # The rest of the body is read (and dropped) so that the next request is framed
            # right; a body that cannot be (a malformed chunk) ends the connection.
            try:
                if not body.broken:
                    body.drain()
            except (_Closed, _BadRequest):
                pass
            close = close or body.broken or not body.done
            if exc.status == 400:
                self.guard.note_refusal(f"{method.decode(errors='replace')} {target[:200].decode(errors='replace')}: {exc}")
            return _answer(self.client, exc.status, str(exc), close=close)
        except _Closed:
            return False
        return self._forward(head, body, method, close)

    def _inspect(self, request: _Message, body: _Body) -> None:
        """Read the JSON inference header from ``body`` and apply the rules."""
        limit = self.guard.max_header_bytes
        header_length = request.headers.get(b"inference-header-content-length")
        if header_length is not None:
            if not header_length.isdigit():
                raise _BadRequest(f"Inference-Header-Content-Length {header_length[:40]!r} is not a number")
            wanted = int(header_length)
            if wanted > limit:
                raise _BadRequest(f"Inference-Header-Content-Length {wanted} is above the HTTP guard's "
                                  f"{limit} bytes; send tensors as binary data, not in the JSON header", 413)
        else:
            wanted = limit + 1
        encoding = request.headers.get(b"content-encoding", b"identity").lower()
        if encoding == b"identity":
            header = body.payload(wanted, self.guard.idle_s)
        elif encoding in (b"gzip", b"deflate"):
            header = _decompress(body.payload(limit + 1, self.guard.idle_s), wanted)
        else:
            raise _BadRequest(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
        if header_length is None and len(header) > limit:
            raise _BadRequest(f"a JSON inference request above the HTTP guard's {limit} bytes; "
                              f"send tensors as binary data (binary_data_size)", 413)
        try:
            check_inference_header(header, max_input_bytes=self.guard.max_input_bytes)
        except RequestError as exc:
            raise _BadRequest(str(exc)) from None

    def _upstream(self) -> tuple[socket.socket, _Reader]:
        """The upstream connection: the one kept from the last request unless Triton closed it."""
        if self.up is not None and self.up_reader is not None:
            try:  # readable now means closed (or stray bytes): either way not reusable
                self.up.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                stale = True
            except BlockingIOError:
                stale = False
            except OSError:
                stale = True
            if not stale:
                return self.up, self.up_reader
            self._close_upstream()
        address = self.guard.upstream()
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up, self.up_reader = sock, _Reader(sock)
        return sock, self.up_reader

    def _forward(self, head: bytes, body: _Body, method: bytes, close: bool) -> bool:
        try:
            up, up_reader = self._upstream()
        except OSError as exc:
            with contextlib.suppress(_Closed, _BadRequest):
                body.drain()
            return _answer(self.client, 503, f"Triton is not reachable ({exc}): hps serve is starting or "
                                             f"restarting it; retry shortly", close=close)
        try:
            pending = [head]
            size = len(head)
            for piece in body.pieces():
                pending.append(piece)
                size += len(piece)
                if size >= _CHUNK:
                    _send(up, pending)
                    pending, size = [], 0
            _send(up, pending)
            return self._relay(up_reader, method, close) and not close
        except _UpstreamBroken as exc:
            self._close_upstream()
            if not exc.started:
                with contextlib.suppress(_Closed, _BadRequest):
                    body.drain()
                return _answer(self.client, 503, f"Triton closed the connection before answering ({exc}): "
                                                 f"it may have died; hps serve restarts it; retry shortly",
                               close=close)
            return False  # part of the answer went out: only closing tells the client
        except _BadRequest as exc:  # a malformed chunk midway: the upstream stream is spoiled too
            self._close_upstream()
            _answer(self.client, exc.status, str(exc), close=True)
            return False

    def _relay(self, up_reader: _Reader, method: bytes, close: bool) -> bool:
        """Relay one response from Triton; True when both connections stay usable."""
        started = False
        try:
            while True:
                response = _Message(up_reader.until(b"\r\n\r\n", _MAX_HEAD_BYTES))
                status = response.start.split(b" ", 2)
                code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
                if 100 <= code < 200:
                    if code != 100:  # a 100 was ours to send (Expect is answered by the guard)
                        self.client.sendall(response.head)
                    continue
                break
            if method == b"HEAD" or code in (204, 304):
                kind, length = "none", 0
            else:
                kind, length = response.framing()
                if kind == "none":
                    kind = "until_close"
            body = _Body(up_reader, kind, length, keep=False)
            pending = [response.head]
            size = len(response.head)
            started = True
            for piece in body.pieces():
                pending.append(piece)
                size += len(piece)
                if size >= _CHUNK:
                    self.client.sendall(b"".join(pending))
                    pending, size = [], 0
            self.client.sendall(b"".join(pending))
        except (_Closed, _BadRequest, ValueError) as exc:
            raise _UpstreamBroken(str(exc), started) from None
        except OSError:  # the client's side (reads from Triton raise _Closed): gone, or not reading
            self._close_upstream()  # the rest of the answer is still in it
            return False
        if kind == "until_close" or response.wants_close(status[0]):
            self._close_upstream()
            return False
        return True


class _UpstreamBroken(Exception):
    def __init__(self, message: str, started: bool) -> None:
        super().__init__(message)
        self.started = started


def _send(sock: socket.socket, pieces: list[bytes]) -> None:
    if not pieces:
        return
    try:
        sock.sendall(pieces[0] if len(pieces) == 1 else b"".join(pieces))
    except OSError as exc:
        raise _UpstreamBroken(str(exc), False) from exc


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0], *(line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name)]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _decompress(data: bytes, wanted: int) -> bytes:
    """The first ``wanted`` bytes of a gzip or zlib (deflate) body, never more in memory."""
    try:
        return zlib.decompressobj(wbits=47).decompress(data, wanted)  # 47: zlib or gzip header
    except zlib.error as exc:
        raise _BadRequest(f"the body is not valid gzip/deflate ({exc}); fix Content-Encoding") from None


_REASONS = {400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def _answer(sock: socket.socket, status: int, message: str, *, close: bool) -> bool:
    """Send ``status`` with Triton's error body ``{"error": message}``; False when closing."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
    try:
        sock.sendall(head.encode() + body)
    except OSError:
        return False
    return not close

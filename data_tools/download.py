"""Our own image downloader: http.client with kept-alive connections, built for hostile web URLs.

Why not img2dataset inside the pipeline: we need one record in, one verdict out, in input
order, with the drop reason named (so the manifest can say *why* 30% of a crawl vanished),
and no dependency that pins an old webdataset. img2dataset stays a valid *input* (its
output folders are read by :func:`data_tools.sources.read_img2dataset`) and a benchmark
baseline (bench/bench_data.py).

Why not urllib: it opens a new TCP connection (and resolves the host again) for every URL
and runs each request through a chain of handler objects. Crawl lists hold many images per
host, so this client keeps finished connections open per host (HTTP keep-alive) and hands
them to the next request for the same host, and caches host-name lookups (failures too,
briefly: a dead host is asked once, not once per URL). On loopback that halves the
client's CPU per request and spares the server a connection per image.

Every fetch ends in exactly one of: bytes, or a drop reason from :data:`REASONS` /
``http_<code>``. Transient failures (5xx, 408/425/429, timeouts, resets, truncated bodies)
are retried with exponential backoff; permanent ones (404, 403, bad scheme, too large, HTML)
are not, because retrying them only burns the crawl budget. A kept-alive connection that
the server closed while it sat idle is replaced at once, without counting as an attempt.
"""

from __future__ import annotations

import http.client
import random
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

ALLOWED_SCHEMES = ("http", "https")
HTML_TYPES = ("text/html", "application/xhtml+xml")
REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 256 * 1024
DNS_TTL = 300.0
"""Seconds a resolved host name is reused."""
DNS_FAIL_TTL = 30.0
"""Seconds a host name that did not resolve is not asked again."""
DNS_MAX_HOSTS = 100_000
"""Host names remembered at most (about 300 bytes each)."""
_IDLE_PER_HOST = 64
"""Kept-alive connections parked per host (more are closed); one per thread is enough."""

#: Reasons a fetch can fail besides ``http_<status>`` (documented in docs/DATA.md).
REASONS = (
    "url_bad_scheme",        # not http(s): file://, ftp://, s3://, javascript: ...
    "url_invalid",           # unparsable URL
    "timeout",               # no complete answer within --timeout (after retries)
    "too_large",             # Content-Length or body beyond --max-image-bytes
    "html_not_image",        # server answered text/html (error page, login wall)
    "too_many_redirects",    # more than --max-redirects hops
    "redirect_bad_scheme",   # a redirect to a non-http(s) URL
    "truncated",             # body shorter than its Content-Length
    "dns_error",             # host name does not resolve
    "ssl_error",             # certificate / handshake failure
    "connection_error",      # refused, reset, protocol errors
)


@dataclass(frozen=True)
class DownloadOptions:
    """Knobs of the downloader (all per URL); picklable so worker processes get a copy."""

    timeout: float = 10.0
    """Seconds for one attempt: connect, headers and the whole body."""
    retries: int = 2
    """Extra attempts for transient failures (5xx, 429, timeouts, resets)."""
    backoff: float = 0.5
    """Delay before the first retry in seconds; doubles per retry, +-25% jitter."""
    max_bytes: int = 20 * 1024 * 1024
    """Stop reading (and drop as too_large) beyond this many bytes."""
    max_redirects: int = 5
    threads: int = 32
    """Download threads per worker process, as img2dataset's ``--thread_count``: a run keeps
    ``workers x threads`` requests in flight (see :func:`requests_in_flight`)."""
    user_agent: str = "webmcse-data/0.1 (research image-text dataset builder)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def requests_in_flight(opts: DownloadOptions, workers: int) -> int:
    """Concurrent requests of a run with ``workers`` processes: threads are per process."""
    return max(1, opts.threads) * max(1, workers)


@dataclass
class FetchResult:
    url: str
    data: bytes | None = None
    reason: str | None = None
    status: int | None = None
    attempts: int = 0
    content_type: str | None = None


@dataclass
class NetStats:
    """What the connection layer did (tests and the end-of-run summary read it)."""

    requests: int = 0
    connections: int = 0
    """TCP connections opened (a request on a kept-alive one opens none)."""
    reused: int = 0
    """Requests sent on a connection an earlier request had used."""
    stale: int = 0
    """Kept-alive connections the server had closed, replaced without an attempt."""
    dns_lookups: int = 0
    dns_cached: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in ("requests", "connections", "reused", "stale", "dns_lookups",
                                              "dns_cached")}


class _Drop(Exception):
    """A failure with its reason; ``transient`` ones are retried."""

    def __init__(self, reason: str, transient: bool = False, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.status = status


class _Stale(Exception):
    """A reused connection failed before any answer: the server closed it while idle."""


def _is_transient_status(code: int) -> bool:
    return code >= 500 or code in (408, 425, 429)


class _Resolver:
    """Host name -> addresses, cached: getaddrinfo costs a round trip to the resolver (and
    often a lock in libc), and a crawl asks the same few thousand hosts again and again."""

    def __init__(self, stats: NetStats) -> None:
        self._cache: dict[tuple[str, int], tuple[float, list[Any] | None]] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self.stats = stats

    def _cached(self, key: tuple[str, int]) -> list[Any] | None:
        hit = self._cache.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        self.stats.add(dns_cached=1)
        if hit[1] is None:
            raise _Drop("dns_error")
        return hit[1]

    def resolve(self, host: str, port: int) -> list[Any]:
        key = (host, port)
        infos = self._cached(key)
        if infos is not None:
            return infos
        with self._lock:
            if len(self._locks) >= DNS_MAX_HOSTS:  # a crawl of many hosts: start over, bounded
                self._locks.clear()
                self._cache.clear()
            host_lock = self._locks.setdefault(key, threading.Lock())
        with host_lock:  # one lookup per host, however many threads want it at once
            infos = self._cached(key)
            if infos is not None:
                return infos
            self.stats.add(dns_lookups=1)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                self._cache[key] = (time.monotonic() + DNS_FAIL_TTL, None)
                raise _Drop("dns_error") from None
            self._cache[key] = (time.monotonic() + DNS_TTL, infos)
            return infos


def _connect(infos: list[Any], timeout: float) -> socket.socket:
    """Connect to the first address that answers (what socket.create_connection does, on
    addresses resolved once)."""
    err: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(addr)
            return sock
        except OSError as exc:
            err = exc
            sock.close()
    raise err or OSError("no address to connect to")


class _Conn(http.client.HTTPConnection):
    """An HTTP(S) connection whose socket goes to a cached address (TLS still checks the
    certificate against the host name)."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float, resolver: _Resolver,
                 tls: ssl.SSLContext | None, tunnel: tuple[str, int] | None = None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.scheme, self._resolver, self._tls = scheme, resolver, tls
        self.used = False
        self.tls_host = tunnel[0] if tunnel else host
        if tunnel:
            self.set_tunnel(*tunnel)

    def connect(self) -> None:
        self.sock = _connect(self._resolver.resolve(self.host, self.port), self.timeout)  # type: ignore[arg-type]
        if self._tunnel_host:
            self._tunnel()
        if self.scheme == "https":
            assert self._tls is not None
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.tls_host)


class _Pool:
    """Idle kept-alive connections per (scheme, host, port, proxy): a thread takes one (or
    opens one), and gives it back after reading a complete answer that allows reuse."""

    def __init__(self, stats: NetStats) -> None:
        self._idle: dict[tuple[Any, ...], list[_Conn]] = {}
        self._lock = threading.Lock()
        self.stats = stats
        self.resolver = _Resolver(stats)
        self._tls: ssl.SSLContext | None = None
        self._proxies = urllib.request.getproxies()

    def tls(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _proxy_for(self, scheme: str, host: str) -> tuple[str, int] | None:
        """http(s)_proxy / no_proxy from the environment, as every other client honours them."""
        proxy = self._proxies.get(scheme)
        if not proxy or urllib.request.proxy_bypass(host):
            return None
        p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        return (p.hostname or "", p.port or 80) if p.hostname else None

    def get(self, scheme: str, host: str, port: int, timeout: float) -> tuple[_Conn, bool]:
        """(connection, via an http proxy that wants absolute URLs)."""
        proxy = self._proxy_for(scheme, host)
        key = (scheme, host, port, proxy)
        with self._lock:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, proxy is not None and scheme == "http"
        tls = self.tls() if scheme == "https" else None
        if proxy is None:
            conn = _Conn(scheme, host, port, timeout, self.resolver, tls)
        elif scheme == "https":  # CONNECT tunnel through the proxy, TLS to the origin
            conn = _Conn(scheme, proxy[0], proxy[1], timeout, self.resolver, tls, tunnel=(host, port))
        else:
            conn = _Conn(scheme, proxy[0], proxy[1], timeout, self.resolver, None)
        conn.pool_key = key  # type: ignore[attr-defined]
        return conn, proxy is not None and scheme == "http"

    def put(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.pool_key, [])  # type: ignore[attr-defined]
            if len(idle) < _IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


class Downloader:
    """Thread-safe fetcher; :meth:`fetch_many` keeps input order. Connections and resolved
    host names are shared by every thread that uses this object."""

    def __init__(self, opts: DownloadOptions | None = None) -> None:
        self.opts = opts or DownloadOptions()
        self.stats = NetStats()
        self._conns = _Pool(self.stats)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def fetch(self, url: str) -> FetchResult:
        """One URL -> bytes or a reason; never raises for anything the network does."""
        res = FetchResult(url=url)
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            res.reason = "url_invalid"
            return res
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            res.reason = "url_bad_scheme"
            return res
        if not parts.hostname:
            res.reason = "url_invalid"
            return res
        delay = self.opts.backoff
        for attempt in range(self.opts.retries + 1):
            res.attempts = attempt + 1
            try:
                res.data, res.status, res.content_type = self._follow(url)
                res.reason = None
                return res
            except _Drop as drop:
                res.reason, res.status = drop.reason, drop.status
                if not drop.transient or attempt == self.opts.retries:
                    return res
            # Jitter spreads retries of many threads hitting the same failing host.
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay *= 2
        return res

    def _follow(self, url: str) -> tuple[bytes, int, str]:
        """One attempt: the request and its redirects, all within one --timeout."""
        deadline = time.monotonic() + self.opts.timeout
        for _ in range(self.opts.max_redirects + 1):
            status, ctype, body, location = self._once(url, deadline)
            if location is None:
                return body, status, ctype
            target = urljoin(url, location)
            if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
                raise _Drop("redirect_bad_scheme", status=status)
            url = target
        raise _Drop("too_many_redirects", status=status)

    def _once(self, url: str, deadline: float) -> tuple[int, str, bytes, str | None]:
        """(status, content type, body, redirect location or None) of one request."""
        for fresh in (False, True):
            try:
                return self._request(url, deadline, fresh)
            except _Stale:
                self.stats.add(stale=1)
        raise _Drop("connection_error", transient=True)

    def _request(self, url: str, deadline: float, fresh: bool) -> tuple[int, str, bytes, str | None]:
        o = self.opts
        p = urlsplit(url)
        scheme = p.scheme.lower()
        try:
            host, port = p.hostname or "", p.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise _Drop("url_invalid") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Drop("timeout", transient=True)
        conn, absolute = self._conns.get(scheme, host, port, left)
        if fresh and conn.used:  # a retry after a stale connection: never reuse another idle one
            conn.close()
            conn.used = False
        reused = conn.used and conn.sock is not None
        target = url if absolute else (p.path or "/") + (f"?{p.query}" if p.query else "")
        hosthdr = p.netloc.rpartition("@")[2]
        keep = False
        try:
            try:
                if conn.sock is None:
                    conn.connect()
                    self.stats.add(connections=1)
                conn.putrequest("GET", target, skip_host=True)
                conn.putheader("Host", hosthdr)
                conn.putheader("User-Agent", o.user_agent)
                conn.putheader("Accept", "image/*,*/*;q=0.5")
                conn.endheaders()
                self.stats.add(requests=1, reused=int(reused))
                conn.used = True
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                if reused:
                    raise _Stale() from exc
                raise _Drop("connection_error", transient=True) from None
            status = resp.status
            ctype = resp.headers.get_content_type()
            declared = resp.headers.get("Content-Length")
            length = int(declared) if declared and declared.isdigit() else None
            if status in REDIRECTS:
                location = resp.headers.get("Location") or resp.headers.get("URI")
                if not location:
                    raise _Drop(f"http_{status}", status=status)
                keep = self._drain(resp, length, deadline)
                return status, ctype, b"", location
            if status >= 400:
                keep = self._drain(resp, length, deadline)
                raise _Drop(f"http_{status}", transient=_is_transient_status(status), status=status)
            if ctype in HTML_TYPES:
                keep = self._drain(resp, length, deadline)
                raise _Drop("html_not_image", status=status)
            if length is not None and length > o.max_bytes:
                raise _Drop("too_large", status=status)
            body = self._read(resp, length, deadline, status)
            keep = not resp.will_close
            return status, ctype, body, None
        except (_Drop, _Stale):
            raise
        except TimeoutError:
            raise _Drop("timeout", transient=True) from None
        except http.client.IncompleteRead:
            raise _Drop("truncated", transient=True) from None
        except ssl.SSLError:
            raise _Drop("ssl_error") from None
        except (http.client.HTTPException, OSError, ValueError):
            raise _Drop("connection_error", transient=True) from None
        finally:
            if keep:
                self._conns.put(conn)
            else:
                conn.close()

    def _read(self, resp: http.client.HTTPResponse, length: int | None, deadline: float, status: int) -> bytes:
        """The body, one socket read at a time so the attempt's deadline holds even against a
        server that drips bytes; short of its Content-Length means truncated."""
        chunks: list[bytes] = []
        total = 0
        while True:
            self._set_timeout(resp, deadline)
            block = resp.read1(_CHUNK)
            if not block:
                break
            total += len(block)
            if total > self.opts.max_bytes:
                raise _Drop("too_large", status=status)
            chunks.append(block)
            if length is not None and total >= length:
                break
        if length is not None and total < length:  # the peer closed early
            raise _Drop("truncated", transient=True, status=status)
        resp.close()  # all of it was read: the connection may carry the next request
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _set_timeout(resp: http.client.HTTPResponse, deadline: float) -> None:
        """Each socket read may wait at most what is left of the attempt's --timeout."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Drop("timeout", transient=True)
        sock = getattr(resp.fp, "raw", None)
        sock = getattr(sock, "_sock", None)
        if sock is not None:
            sock.settimeout(left)

    def _drain(self, resp: http.client.HTTPResponse, length: int | None, deadline: float) -> bool:
        """Read a small unwanted body so the connection can serve the next request; True if
        it may be kept."""
        if length is None or length > 64 * 1024 or resp.will_close:
            return False
        self._set_timeout(resp, deadline)
        resp.read()
        return True

    def fetch_many(self, urls: Iterable[str]) -> list[FetchResult]:
        """Fetch concurrently (``threads`` at a time); results in the order of ``urls``."""
        urls = list(urls)
        if len(urls) <= 1 or self.opts.threads <= 1:
            return [self.fetch(u) for u in urls]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.opts.threads, thread_name_prefix="fetch")
        return list(self._pool.map(self.fetch, urls))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._conns.close()

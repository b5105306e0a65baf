"""Our own image downloader: stdlib urllib + a thread pool, built for hostile web URLs.

Why not img2dataset inside the pipeline: we need one record in, one verdict out, in input
order, with the drop reason named (so the manifest can say *why* 30% of a crawl vanished),
and no dependency that pins an old webdataset. img2dataset stays a valid *input* (its
output folders are read by :func:`data_tools.sources.read_img2dataset`) and a benchmark
baseline (bench/bench_data.py).

Every fetch ends in exactly one of: bytes, or a drop reason from :data:`REASONS` /
``http_<code>``. Transient failures (5xx, 408/425/429, timeouts, resets, truncated bodies)
are retried with exponential backoff; permanent ones (404, 403, bad scheme, too large, HTML)
are not, because retrying them only burns the crawl budget.
"""

from __future__ import annotations

import http.client
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

ALLOWED_SCHEMES = ("http", "https")
HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHUNK = 64 * 1024

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
    """Concurrent requests (threads of the main process; see pipeline.prefetch)."""
    user_agent: str = "webmcse-data/0.1 (research image-text dataset builder)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FetchResult:
    url: str
    data: bytes | None = None
    reason: str | None = None
    status: int | None = None
    attempts: int = 0
    content_type: str | None = None


class _Drop(Exception):
    """A failure with its reason; ``transient`` ones are retried."""

    def __init__(self, reason: str, transient: bool = False, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.status = status


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """Follow at most ``limit`` redirects, and only to http(s) URLs (a redirect to file://
    or ftp:// from an untrusted server must never be followed)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        # The base class has its own caps (10 hops, 4 repeats); ours is the one that counts.
        self.max_redirections = self.max_repeats = limit + 1

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        if target:
            scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                fp.close()
                raise _Drop("redirect_bad_scheme", status=code)
        hops = sum(getattr(req, "redirect_dict", {}).values())
        if hops >= self.limit:
            fp.close()
            raise _Drop("too_many_redirects", status=code)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _is_transient_status(code: int) -> bool:
    return code >= 500 or code in (408, 425, 429)


def _classify_urlerror(exc: urllib.error.URLError) -> _Drop:
    inner = exc.reason
    if isinstance(inner, TimeoutError):
        return _Drop("timeout", transient=True)
    if isinstance(inner, socket.gaierror):
        return _Drop("dns_error")
    if isinstance(inner, ssl.SSLError):
        return _Drop("ssl_error")
    if isinstance(inner, str) and "unknown url type" in inner:
        return _Drop("url_bad_scheme")
    return _Drop("connection_error", transient=True)


class Downloader:
    """Thread-safe fetcher; :meth:`fetch_many` keeps input order."""

    def __init__(self, opts: DownloadOptions | None = None) -> None:
        self.opts = opts or DownloadOptions()
        # ProxyHandler honours http(s)_proxy/no_proxy like every other client on the machine.
        self._opener = urllib.request.build_opener(_RedirectPolicy(self.opts.max_redirects))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def fetch(self, url: str) -> FetchResult:
        """One URL -> bytes or a reason; never raises for anything the network does."""
        res = FetchResult(url=url)
        try:
            parts = urlsplit(url)
        except ValueError:
            res.reason = "url_invalid"
            return res
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            res.reason = "url_bad_scheme"
            return res
        if not parts.netloc:
            res.reason = "url_invalid"
            return res
        delay = self.opts.backoff
        for attempt in range(self.opts.retries + 1):
            res.attempts = attempt + 1
            try:
                res.data, res.status, res.content_type = self._once(url)
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

    def _once(self, url: str) -> tuple[bytes, int, str]:
        o = self.opts
        req = urllib.request.Request(url, headers={"User-Agent": o.user_agent,
                                                   "Accept": "image/*,*/*;q=0.5"})
        deadline = time.monotonic() + o.timeout
        try:
            with self._opener.open(req, timeout=o.timeout) as resp:
                status = int(getattr(resp, "status", 200))
                ctype = resp.headers.get_content_type()
                if ctype in HTML_TYPES:
                    raise _Drop("html_not_image", status=status)
                declared = resp.headers.get("Content-Length")
                length = int(declared) if declared and declared.isdigit() else None
                if length is not None and length > o.max_bytes:
                    raise _Drop("too_large", status=status)
                chunks: list[bytes] = []
                total = 0
                while True:
                    if time.monotonic() > deadline:
                        raise _Drop("timeout", transient=True, status=status)
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    total += len(block)
                    if total > o.max_bytes:
                        raise _Drop("too_large", status=status)
                    chunks.append(block)
                if length is not None and total < length:
                    # http.client returns a short body silently when the peer closes early.
                    raise _Drop("truncated", transient=True, status=status)
                return b"".join(chunks), status, ctype
        except _Drop:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            raise _Drop(f"http_{exc.code}", transient=_is_transient_status(exc.code), status=exc.code) from None
        except urllib.error.URLError as exc:
            raise _classify_urlerror(exc) from None
        except TimeoutError:
            raise _Drop("timeout", transient=True) from None
        except http.client.IncompleteRead:
            raise _Drop("truncated", transient=True) from None
        except ssl.SSLError:
            raise _Drop("ssl_error") from None
        except (http.client.HTTPException, OSError, ValueError):
            raise _Drop("connection_error", transient=True) from None

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

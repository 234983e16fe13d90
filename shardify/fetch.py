"""Fetching images named by URL (Pixmo's published layout: ``image_url`` [+ ``image_sha256``]).

Each fetch either returns the bytes or a skip reason of its own (``http_404``, ``http_403``,
``http_error``, ``timeout``, ``connection_error``, ``sha256_mismatch``, ``bad_url``,
``too_large``); the bytes are then checked like any other image. Server errors (5xx), timeouts
and dropped connections are retried with exponential backoff, as is 429 (a rate limit); other
4xx statuses are not.
Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from shardify.format import IMAGE_EXTENSIONS
from shardify.storage import filesystem

# A response larger than this is not an image anyone trains on; stop reading instead of
# buffering whatever a misbehaving server streams.
MAX_RESPONSE_BYTES = 256 << 20
_CHUNK = 1 << 16
_USER_AGENT = "shardify/0.1 (+https://github.com/streamtrain)"
_ACCEPT = ", ".join(f"image/{ext}" for ext in sorted(set(IMAGE_EXTENSIONS.values()))) + ", image/*;q=0.8"


@dataclass
class FetchOptions:
    """How images named by URL are downloaded; none of it shapes the output of fetches that succeed."""

    workers: int = 16
    """Concurrent downloads (threads; they mostly wait on the network)."""
    timeout_s: float = 20.0
    """Seconds to wait for a connection, and then for each read of the response."""
    retries: int = 3
    """Further attempts after a 5xx status, a timeout or a dropped connection."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one."""

    def problems(self) -> list[str]:
        found = []
        if self.workers < 1:
            found.append(f"--fetch-workers must be at least 1, got {self.workers}")
        if not self.timeout_s > 0:
            found.append(f"--fetch-timeout must be more than 0 seconds, got {self.timeout_s}")
        if self.retries < 0:
            found.append(f"--fetch-retries must be at least 0, got {self.retries}")
        if self.backoff_s < 0:
            found.append(f"fetch backoff must be at least 0 seconds, got {self.backoff_s}")
        return found


@dataclass(frozen=True)
class Fetched:
    """The bytes at one URL, or why there are none (``reason`` empty when the fetch succeeded)."""

    data: bytes | None
    reason: str = ""
    detail: str = ""
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return not self.reason


class _Failure(Exception):
    """One failed attempt: the skip reason it becomes, and whether another attempt may help."""

    def __init__(self, reason: str, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry = retry


def _opener() -> urllib.request.OpenerDirector:
    """HTTP(S) only, proxies from the environment: no file://, ftp:// or data: even via redirects."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    return opener


def expected_digest(sha256: object) -> str | None:
    """The lower-case hex digest a row asks for, or None when it gives none."""
    if sha256 is None:
        return None
    text = (sha256.hex() if isinstance(sha256, bytes) else str(sha256)).strip().lower()
    return text or None


class Fetcher:
    """Downloads URLs on a thread pool; use as a context manager, submit in row order."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self._opener = _opener()
        self._pool = ThreadPoolExecutor(options.workers, thread_name_prefix="shardify-fetch")
        self._closing = threading.Event()

    def submit(self, url: object, sha256: object = None) -> Future[Fetched] | None:
        """Start fetching ``url``; None when the row has no URL (a ``missing`` image)."""
        if url is None or (isinstance(url, str) and not url.strip()):
            return None
        return self._pool.submit(self.fetch, str(url).strip(), expected_digest(sha256))

    def fetch(self, url: str, sha256: str | None = None) -> Fetched:
        """Download ``url`` with retries and verify its digest; never raises for network trouble."""
        if not url.lower().startswith(("http://", "https://")):
            return Fetched(None, "bad_url", f"not an http(s) URL: {url[:200]}")
        attempts = 0
        while True:
            attempts += 1
            try:
                data = self._get(url)
            except _Failure as failure:
                if not failure.retry or attempts > self.options.retries or self._closing.is_set():
                    tries = f" ({attempts} attempts)" if attempts > 1 else ""
                    return Fetched(None, failure.reason, f"{failure.detail}{tries}: {url}", attempts)
                self._closing.wait(self.options.backoff_s * 2 ** (attempts - 1))
                continue
            break
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                return Fetched(None, "sha256_mismatch", f"expected {sha256}, got {actual}: {url}", attempts)
        return Fetched(data, attempts=attempts)

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept": _ACCEPT})
        try:
            with self._opener.open(request, timeout=self.options.timeout_s) as response:
                return _read_capped(response)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (403, 404):
                raise _Failure(f"http_{exc.code}", f"HTTP {exc.code}", retry=False) from None
            if exc.code >= 500 or exc.code == 429:  # server trouble, or a rate limit: wait and retry
                raise _Failure("http_error", f"HTTP {exc.code}", retry=True) from None
            raise _Failure("http_error", f"HTTP {exc.code}", retry=False) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError | socket.timeout):
                raise _Failure(
                    "timeout", f"no response within {self.options.timeout_s:g} s", retry=True
                ) from None
            raise _Failure(
                "connection_error", f"{type(exc.reason).__name__}: {exc.reason}", retry=True
            ) from None
        except TimeoutError:
            raise _Failure(
                "timeout", f"no response within {self.options.timeout_s:g} s", retry=True
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            # Resets, servers closing without a response, cut bodies (IncompleteRead).
            raise _Failure("connection_error", f"{type(exc).__name__}: {exc}", retry=True) from None

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # On an error nobody will read the queued fetches: drop them, and end the running ones
        # after their current attempt, so nothing is downloaded once the conversion has returned.
        if kind is not None:
            self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)


def _read_capped(response: http.client.HTTPResponse) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise _Failure(
            "too_large", f"response of {int(declared)} bytes exceeds {MAX_RESPONSE_BYTES}", retry=False
        )
    chunks, size = [], 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _Failure("too_large", f"response exceeds {MAX_RESPONSE_BYTES} bytes", retry=False)
        chunks.append(chunk)
    return b"".join(chunks)


class ImageFiles:
    """Reads image files named by paths relative to one folder (json-to-tar's ``--image-root``,
    local or ``s3://``) on a thread pool; submitted like :class:`Fetcher`'s URLs. A path that is
    absolute or climbs out of the folder is ``bad_path``, a file that is not there ``missing_file``,
    one that cannot be read ``read_error``."""

    def __init__(self, root: str, workers: int) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = filesystem(self.root)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="shardify-files")

    def submit(self, path: object, sha256: object = None) -> Future[Fetched] | None:
        """Start reading ``path``; None when the row names no file (a ``missing`` image)."""
        if path is None or (isinstance(path, str) and not path.strip()):
            return None
        return self._pool.submit(self.read, path, expected_digest(sha256))

    def read(self, path: object, sha256: str | None = None) -> Fetched:
        if not isinstance(path, str):
            return Fetched(None, "bad_path", f"not one file path: {str(path)[:200]}")
        parts = path.strip().replace("\\", "/").split("/")
        if path.strip().startswith("/") or ".." in parts or ":" in parts[0]:
            return Fetched(None, "bad_path", f"{path[:200]} is not a path inside {self.root}")
        location = "/".join([self._base, *(part for part in parts if part not in ("", "."))])
        try:
            with self.fs.open(location, "rb") as handle:
                data = handle.read(MAX_RESPONSE_BYTES + 1)
        except FileNotFoundError:
            return Fetched(None, "missing_file", f"no file {self.root}/{path}")
        except (OSError, ValueError) as exc:
            return Fetched(None, "read_error", f"{type(exc).__name__}: {exc}: {self.root}/{path}")
        if len(data) > MAX_RESPONSE_BYTES:
            return Fetched(None, "too_large", f"{self.root}/{path} exceeds {MAX_RESPONSE_BYTES} bytes")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            return Fetched(None, "sha256_mismatch", f"expected {sha256}: {self.root}/{path}")
        return Fetched(data, attempts=1)

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)

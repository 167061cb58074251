"""Reads from an object store (`data.remote` = s3://...), with every retry counted and logged.

Three layers retry a failed read, each on its own, and a flaky store must not look healthy:
- botocore retries a request that failed to connect, was reset before its response, or got a 5xx or throttling
  answer (streaming's S3 client: "adaptive" mode; `AWS_MAX_ATTEMPTS`, default 3 attempts);
- s3transfer sends the GetObject again when the body breaks off mid-stream (up to 5 GETs per file);
- streaming downloads the whole file again when all of that failed (`data.download_retry` more attempts, each
  bounded by `data.download_timeout`), then the run fails naming the file.

`CountingS3Downloader` is streaming's own S3 downloader with botocore event hooks that see the first two, and a
wrapper around the download that sees the third. Each retry is logged as one line,
`data.remote: retry #N (layer) what: why`, with N counting all retries of this process.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse

from streaming.base.constant import DEFAULT_TIMEOUT
from streaming.base.storage import download as _download
from streaming.base.storage.download import S3Downloader

log = logging.getLogger(__name__)

_lock = threading.Lock()
RETRIES: dict[str, int] = {"botocore": 0, "s3transfer": 0, "streaming": 0}
"""Retries of this process, by layer."""


def object_absent(error: Exception) -> bool:
    """The store answered that the object does not exist (or may not be read), as opposed to a failed request."""
    if isinstance(error, FileNotFoundError):
        return True
    response = getattr(error, "response", None)  # botocore ClientError
    return isinstance(response, dict) and response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "403")


def note_retry(layer: str, what: str, why: str = "") -> None:
    with _lock:
        RETRIES[layer] += 1
        total = sum(RETRIES.values())
    log.warning("data.remote: retry #%d (%s) %s%s", total, layer, what, f": {why}" if why else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class CountingS3Downloader(S3Downloader):
    """streaming's S3Downloader, counting the retries under it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._gets = 0
        self._remote = ""

    def _create_s3_client(self, *args, **kwargs):
        out = super()._create_s3_client(*args, **kwargs)
        events = self._s3_client.meta.events
        events.register("request-created.s3", self._on_request)  # once per attempt, retries included
        events.register("before-call.s3.GetObject", self._on_get)  # once per API call (s3transfer re-calls it)
        return out

    def _on_request(self, request, operation_name, **kwargs) -> None:
        attempt = request.context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            note_retry("botocore", f"{operation_name} {self._remote} (attempt {attempt})")

    def _on_get(self, **kwargs) -> None:
        self._gets += 1
        if self._gets > 1:  # the previous GetObject's body broke off
            note_retry("s3transfer", f"GetObject {self._remote} (GET {self._gets})")

    def _download_file_impl(self, remote: str, local: str, timeout: float) -> None:
        self._gets, self._remote = 0, remote
        super()._download_file_impl(remote, local, timeout)

    def download(self, remote, local, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            super().download(remote, local, timeout)
        except Exception as e:
            # streaming's retry() calls this again (data.download_retry) or gives up and raises to the loader; an
            # absent object is an answer (train.data asks for optional files), not a failed attempt
            if urllib.parse.urlparse(str(remote)).scheme == "s3" and not object_absent(e):
                note_retry("streaming", f"download of {remote} failed", _first_line(e))
            raise


def install() -> None:
    """Route streaming's s3:// downloads (shards, index files, our small root files) through CountingS3Downloader."""
    _download.DOWNLOADER_MAPPINGS["s3"] = CountingS3Downloader

"""Resumable, checksum-verified, atomic downloads (and safe archive extraction).

`download(url, dest)` streams into `dest.part`; an interrupted transfer leaves only that journal,
and the next call resumes it with an HTTP Range request. The final name appears (by rename) only
after the whole file arrived and its sha256 matched, so `dest` is never half-written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download that failed; the message says what happened and whether rerunning resumes it."""


class _PermanentError(DownloadError):
    """A failure that retrying cannot fix (HTTP error status, a web page instead of the file)."""


def sha256_of(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, chunk: int) -> None:
    """Append the missing bytes of `url` to `part` (Range request when `part` is non-empty)."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "cpsam-data-prep"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the journal already holds everything
            return
        raise _PermanentError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: cannot connect ({exc})") from exc
    with resp:
        if have and resp.status != 206:  # server ignored the Range header: start over
            have = 0
            part.unlink(missing_ok=True)
        ctype = resp.headers.get("Content-Type", "")
        if ctype.startswith("text/html") and not part.name.endswith((".html.part", ".htm.part")):
            raise _PermanentError(
                f"{url}: the server sent a web page instead of the file (a login, quota or "
                "confirmation page, common with Google Drive); download it in a browser "
                f"and save it as {part.name[: -len('.part')]}"
            )
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        got = 0
        bar = tqdm(
            total=(expected + have) if expected is not None else None,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.name[: -len(".part")],
            disable=not progress,
        )
        try:
            with open(part, "ab") as fh:
                while block := resp.read(chunk):
                    fh.write(block)
                    got += len(block)
                    bar.update(len(block))
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset connection, timeout
            raise DownloadError(
                f"{url}: transfer interrupted after {have + got} bytes "
                f"({type(exc).__name__}); rerun to resume"
            ) from exc
        finally:
            bar.close()
        if expected is not None and got < expected:
            raise DownloadError(
                f"{url}: transfer interrupted after {have + got} of {have + expected} bytes; rerun to resume"
            )


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    chunk: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` (resumable, verified, atomic) and return `dest`.

    An existing `dest` whose sha256 matches (or any existing `dest` when no checksum is known) is
    kept. A broken transfer is resumed up to `retries` times, and again by the next call. A
    checksum mismatch deletes the downloaded bytes and raises DownloadError with both digests.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256.lower():
            return dest
        raise DownloadError(
            f"{dest}: exists but its sha256 {sha256_of(dest)} != expected {sha256}; "
            "delete it to download again"
        )
    part = _part_path(dest)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout=timeout, progress=progress, chunk=chunk)
            break
        except DownloadError as exc:
            if attempt == retries or isinstance(exc, _PermanentError):
                raise
    if not part.exists():
        raise DownloadError(f"{url}: server sent no data")
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{url}: checksum mismatch, sha256 {got} != expected {sha256.lower()}; "
                "the corrupt download was deleted"
            )
    os.replace(part, dest)
    return dest


def _check_member(root: Path, name: str, archive: Path) -> None:
    target = (root / name).resolve()
    if not str(target).startswith(str(root.resolve()) + os.sep) and target != root.resolve():
        raise DownloadError(f"{archive}: refuses to extract member {name!r} outside the target folder")


def extract(archive: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Extract a .zip / .tar(.gz) into `out`, once and atomically per top-level entry.

    Members go to a temporary folder first and are moved into `out` at the end; a stamp file
    `out/.extracted-<archive name>` marks completion, so a second call does nothing.
    """
    archive, out = Path(archive), Path(out)
    stamp = out / f".extracted-{archive.name}"
    if stamp.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=out))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_member(tmp, name, archive)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    _check_member(tmp, m.name, archive)
                tf.extractall(tmp, filter="data")
        else:
            raise DownloadError(f"{archive}: not a zip or tar archive")
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
        stamp.write_text("ok\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

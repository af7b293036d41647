"""Downloads against a local HTTP server on 127.0.0.1 (never the internet): resume after a broken
transfer with an HTTP Range request, checksum mismatch rejected, nothing half-written, extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
import tifffile

from data_prep.download import DownloadError, download, extract


def _fixture_zip() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as zf:  # stored, so the archive is big enough to cut in the middle
        for k in range(3):
            img = io.BytesIO()
            tifffile.imwrite(img, rng.integers(0, 255, (64, 64), dtype=np.uint8))
            zf.writestr(f"set/im{k}_img.tif", img.getvalue())
    return buf.getvalue()


class _Server:
    """Serves `payload` at /fixture.zip with Range support; can cut the next N responses short."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cut_after: list[int] = []  # byte counts at which to drop the connection, one per request
        self.requests: list[str | None] = []  # the Range header of each request
        self.html = False  # answer with a web page (like a Google Drive quota page)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if self.path != "/fixture.zip":
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                if server.html:
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}"
                    )
                self.end_headers()
                if server.cut_after:
                    n = server.cut_after.pop(0)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fixture.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload() -> bytes:
    return _fixture_zip()


def test_resume_after_broken_transfer(tmp_path, payload):
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "fixture.zip"
    with _Server(payload) as srv:
        srv.cut_after = [len(payload) // 3]
        with pytest.raises(DownloadError, match="rerun to resume"):
            download(srv.url, dest, sha256=sha, retries=0, progress=False)
        assert not dest.exists()  # never a half-written final file
        part = tmp_path / "fixture.zip.part"
        assert part.stat().st_size == len(payload) // 3
        download(srv.url, dest, sha256=sha, retries=0, progress=False)
        assert srv.requests == [None, f"bytes={len(payload) // 3}-"]  # the second request resumed
    assert dest.read_bytes() == payload and not part.exists()


def test_automatic_retries_resume(tmp_path, payload):
    with _Server(payload) as srv:
        srv.cut_after = [1000, 5000]
        download(
            srv.url, tmp_path / "f.zip", sha256=hashlib.sha256(payload).hexdigest(), retries=2, progress=False
        )
        assert srv.requests == [None, "bytes=1000-", "bytes=6000-"]
    assert (tmp_path / "f.zip").read_bytes() == payload


def test_checksum_mismatch_rejected(tmp_path, payload):
    dest = tmp_path / "fixture.zip"
    with _Server(payload) as srv:
        with pytest.raises(DownloadError, match="checksum mismatch.*" + "0" * 64):
            download(srv.url, dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []  # corrupt bytes deleted, no final file


def test_existing_file_checked_and_http_errors(tmp_path, payload):
    dest = tmp_path / "fixture.zip"
    dest.write_bytes(b"stale")
    with _Server(payload) as srv:
        with pytest.raises(DownloadError, match="exists but its sha256"):
            download(srv.url, dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(srv.url.replace("fixture", "missing"), tmp_path / "m.zip", retries=0, progress=False)


def test_extract_once_and_rejects_escaping_members(tmp_path, payload):
    archive = tmp_path / "fixture.zip"
    archive.write_bytes(payload)
    out = tmp_path / "raw"
    extract(archive, out)
    assert sorted(p.name for p in (out / "set").iterdir()) == ["im0_img.tif", "im1_img.tif", "im2_img.tif"]
    (out / "set" / "im0_img.tif").unlink()
    extract(archive, out)  # stamped: not extracted again
    assert not (out / "set" / "im0_img.tif").exists()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(DownloadError, match="outside the target folder"):
        extract(evil, tmp_path / "raw2")
    assert not (tmp_path / "outside.txt").exists()


def test_html_page_instead_of_file_rejected(tmp_path, payload):
    with _Server(payload) as srv:
        srv.html = True
        with pytest.raises(DownloadError, match="web page instead of the file.*fixture.zip"):
            download(srv.url, tmp_path / "fixture.zip", retries=3, progress=False)
        assert len(srv.requests) == 1  # not retried: retrying cannot help
    assert not (tmp_path / "fixture.zip").exists()

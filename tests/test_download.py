"""download: local file/folder, a real HTTP server on 127.0.0.1 (good data and every failure
mode the issue lists), sha256 pin, size cap, and an unknown hub id (offline here)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import pytest

from instructflow.config import DataConfig
from instructflow.rows import data_files
from tasks.download import DownloadError, download, fingerprint, source_kind

ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three")]
BODY = json.dumps(ROWS).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", "Sat, 01 Nov 2025 00:00:00 GMT")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/data.json":
            self._send(200, BODY)
        elif path == "/missing.json":
            self._send(404, b"not found", "text/plain")
        elif path == "/boom.json":
            self._send(500, b"internal error", "text/plain")
        elif path == "/page.json":
            self._send(200, b"<!DOCTYPE html><html><body>Login</body></html>", "text/html")
        elif path == "/disguised.json":
            self._send(200, b"\n<!doctype html><html><body>502</body></html>")
        elif path == "/big.json":
            self._send(200, b"[" + b" " * 5000 + b"]")
        elif path == "/stream.json":
            # No Content-Length: only the running byte count can enforce the cap.
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"[" + b" " * 5000 + b"]")
        elif path == "/hang.json":
            self.release.wait(30)  # accepts the connection, never answers in time


@pytest.fixture
def server():
    _Handler.release.clear()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Handler.release.set()
    srv.shutdown()
    srv.server_close()


def test_local_file_and_folder(home, tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ref = download(DataConfig(source=str(f)))
    assert [p.name for p in data_files(ref)] == ["one.jsonl"]
    assert data_files(ref)[0].read_bytes() == f.read_bytes()
    source = json.loads(ref.file("source.json").read_text())
    assert source == {"source": str(f), "kind": "local", "files": ["one.jsonl"]}
    assert ref.figures == {"bytes": f.stat().st_size, "files": 1}

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps(ROWS))
    (folder / "sub" / "b.csv").write_text("instruction,input,output\nSay x.,,x\n")
    (folder / "notes.txt").write_text("not data")
    ref = download(DataConfig(source=str(folder)))
    assert [p.relative_to(ref.dir / "data").as_posix() for p in data_files(ref)] == [
        "a.json",
        "sub/b.csv",
    ]
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DownloadError, match="folder holds no .json/.jsonl/.csv/.parquet files"):
        download(DataConfig(source=str(empty)))
    with pytest.raises(DownloadError, match="no such file or directory"):
        source_kind(str(tmp_path / "nope.json"))


def test_url_download_records_source_and_validates(home, server):
    from instructflow.config import ValidateConfig
    from tasks.validate import validate

    cfg = DataConfig(source=f"{server}/data.json", timeout_s=5)
    assert source_kind(cfg.source) == "url"
    assert fingerprint(cfg)["last-modified"] == "Sat, 01 Nov 2025 00:00:00 GMT"
    ref = download(cfg)
    assert data_files(ref)[0].read_bytes() == BODY
    assert json.loads(ref.file("source.json").read_text())["kind"] == "url"
    clean = validate(ref, ValidateConfig()).file("clean.jsonl").read_text().splitlines()
    assert [json.loads(line)["output"] for line in clean] == ["one", "two", "three"]


def test_sha256_pin(home, server):
    good = hashlib.sha256(BODY).hexdigest()
    ref = download(DataConfig(source=f"{server}/data.json", sha256=good, timeout_s=5))
    assert data_files(ref)[0].read_bytes() == BODY
    with pytest.raises(DownloadError, match=r"sha256 [0-9a-f]{12}… does not match the pin"):
        download(DataConfig(source=f"{server}/data.json", sha256="0" * 64, timeout_s=5))


@pytest.mark.parametrize(
    "path,message",
    [
        ("missing.json", r"missing.json: HTTP 404$"),
        ("boom.json", r"boom.json: HTTP 500$"),
        ("page.json", r"page.json: server returned HTML, not data \(text/html\)"),
        ("disguised.json", r"disguised.json: server returned an HTML page, not data"),
        ("big.json", r"big.json: 5002 bytes is larger than data.max_bytes=1000"),
        ("stream.json", r"stream.json: larger than data.max_bytes=1000"),
    ],
)
def test_url_failures_are_one_line(home, server, path, message):
    cfg = DataConfig(source=f"{server}/{path}", timeout_s=5, max_bytes=1000)
    with pytest.raises(DownloadError, match=message) as err:
        download(cfg)
    assert "\n" not in str(err.value)
    assert not list((home / "artifacts" / "download").glob("*"))  # nothing half-published


def test_url_that_never_answers_times_out(home, server):
    cfg = DataConfig(source=f"{server}/hang.json", timeout_s=0.5)
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match=r"hang.json: ReadTimeout"):
        download(cfg)
    with pytest.raises(DownloadError, match=r"hang.json: ReadTimeout"):
        fingerprint(cfg)
    assert time.perf_counter() - t0 < 10


def test_unknown_hub_id_fails_fast_with_a_clear_message(home):
    cfg = DataConfig(source="no-such-user-xyz/no-such-dataset-xyz", timeout_s=5)
    assert source_kind(cfg.source) == "hub"
    t0 = time.perf_counter()
    with pytest.raises(DownloadError) as err:
        download(cfg)
    message = str(err.value)
    assert message.startswith("no-such-user-xyz/no-such-dataset-xyz: hub dataset unavailable")
    assert "check the id" in message and "\n" not in message
    assert time.perf_counter() - t0 < 20


def test_builtin_ch07_is_the_lecture_file_with_its_licence(home):
    from tasks.download import BUILTIN_FILES, DATA_DIR

    ref = download(DataConfig(source="builtin:ch07"))
    (copied,) = data_files(ref)
    assert copied.read_bytes() == BUILTIN_FILES["builtin:ch07"].read_bytes()
    rows = json.loads(copied.read_text())
    assert len(rows) == 1100 and set(rows[0]) == {"instruction", "input", "output"}
    notice = (DATA_DIR / "ch07" / "NOTICE.md").read_text()
    assert "Apache License" in notice and "rasbt/LLMs-from-scratch" in notice
    assert "Apache License" in (DATA_DIR / "ch07" / "LICENSE").read_text()
    with pytest.raises(DownloadError, match="unknown builtin dataset .*builtin:ch07"):
        download(DataConfig(source="builtin:nope"))

"""Network inputs and globs (docs/robustness.md, "Untrusted files" and the cases table): URLs get a default
timeout, a byte limit and the decompression-bomb guard of files (served here by a local http.server on 127.0.0.1);
globs and folder walks do not follow symbolic links out of their root and do not loop."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import crane_hf.models.crane.image_reading as image_reading
from crane_hf.commands.cli import main
from crane_hf.io.image_files import find_image_inputs
from crane_hf.models.crane.image_reading import read_image_url

from .tiny_models import write_test_images


def _png(width: int = 30, height: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """A few bytes whose PNG header claims 30000 x 30000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


REDIRECTS = {
    "ftp": "ftp://127.0.0.1:1/x.png",
    "file": "file:///etc/passwd",
    "data": "data:image/png;base64,AAAA",
    "gopher": "gopher://127.0.0.1:1/x",
    "ok": "/ok.png",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        try:
            if self.path == "/ok.png":
                self._send(_png())
            elif self.path == "/bomb.png":
                self._send(_bomb_png())
            elif self.path == "/claims-a-gigabyte":
                self._send(b"\x89PNG", length=10**9)
            elif self.path in ("/endless", "/trickle"):  # no Content-Length: the body ends when the server closes
                self.send_response(200)
                self.end_headers()
                pause = 0.2 if self.path == "/trickle" else 0.0
                for _ in range(100_000):
                    self.wfile.write(b"x" * (1 if pause else 65536))
                    self.wfile.flush()
                    time.sleep(pause)
            elif self.path.startswith("/redirect-to-"):
                self.send_response(302)
                self.send_header("Location", REDIRECTS[self.path.removeprefix("/redirect-to-")])
                self.end_headers()
            else:
                self.send_error(404, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_server():
    """A server that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    listener.close()


def _bounded(call, seconds: float = 60):
    """Run `call` in a thread and fail the test if it has not returned within `seconds` (never a hang)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome, time.monotonic() - started


def test_a_url_image_is_read_and_scored_like_the_file(server, tiny_model_dir, tmp_path):
    image = read_image_url(f"{server}/ok.png")
    assert image.size == (30, 20)
    (tmp_path / "ok.png").write_bytes(_png())
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    from_url, from_file = detector(f"{server}/ok.png"), detector(str(tmp_path / "ok.png"))
    assert from_url["score"] == from_file["score"]
    assert np.array_equal(from_url["anomaly_map"], from_file["anomaly_map"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/bomb.png", "refused, too many pixels to decode safely"),
        ("/claims-a-gigabyte", "refused, 1,000,000,000 bytes exceeds the limit of 67,108,864 bytes"),
        ("/endless", "refused, the body exceeds the limit of 67,108,864 bytes"),
        ("/missing.png", "HTTP error 404"),
    ],
)
def test_url_bodies_are_bounded_and_guarded_like_files(server, path, message):
    outcome, _ = _bounded(lambda: read_image_url(f"{server}{path}"))
    error = outcome.get("error")
    assert isinstance(error, ValueError) and str(error).startswith(f"{server}{path}: ") and message in str(error)


def test_a_smaller_byte_limit_is_honoured(server):
    with pytest.raises(ValueError, match="exceeds the limit of 100 bytes"):
        read_image_url(f"{server}/ok.png", max_bytes=100)


def test_a_server_that_never_answers_times_out_by_default(silent_server, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(image_reading, "DEFAULT_URL_TIMEOUT", 1.0)  # the default path, shortened for the test
    detector = pipeline("zero-shot-anomaly-detection", model=tiny_model_dir)
    outcome, seconds = _bounded(lambda: detector(silent_server))
    assert isinstance(outcome.get("error"), ValueError), outcome
    assert str(outcome["error"]) == f"{silent_server}: no complete answer within 1 s"
    assert seconds < 30


def test_a_trickling_server_is_cut_at_the_deadline(server):
    outcome, seconds = _bounded(lambda: read_image_url(f"{server}/trickle", timeout=1.0))
    assert "no complete answer within 1 s" in str(outcome.get("error"))
    assert seconds < 30


def test_only_http_urls_are_fetched():
    with pytest.raises(ValueError, match="only http:// and https:// URLs are read"):
        read_image_url("file:///etc/passwd")


@pytest.mark.parametrize("scheme", ["ftp", "file", "data", "gopher"])
def test_a_redirect_to_another_scheme_is_refused(server, scheme):
    url = f"{server}/redirect-to-{scheme}"
    outcome, _ = _bounded(lambda: read_image_url(url))
    error = outcome.get("error")
    assert isinstance(error, ValueError), outcome
    assert (
        str(error) == f"{url}: refused, it redirects to {REDIRECTS[scheme]} (only http:// and https:// are followed)"
    )


def test_a_redirect_within_http_is_followed(server):
    assert read_image_url(f"{server}/redirect-to-ok").size == (30, 20)


@pytest.fixture
def linked_tree(tmp_path):
    """dir/ with 2 images, a link to "/", a link loop, a link to a folder and to a file outside, and a
    link to an image inside (which is kept)."""
    root = tmp_path / "dir"
    write_test_images(root / "sub", count=2)
    outside = tmp_path / "outside"
    write_test_images(outside, count=1)
    (root / "to_root").symlink_to("/", target_is_directory=True)
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)
    (root / "to_outside").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "stolen.png").symlink_to(outside / "part_0.png")
    (root / "alias.png").symlink_to(root / "sub" / "part_1.png")
    return root


def test_globs_and_folders_do_not_follow_links_out_or_loop(linked_tree, tmp_path):
    expected = sorted([str(linked_tree / "sub" / "part_0.png"), str(linked_tree / "sub" / "part_1.png")])
    for inputs in ([f"{linked_tree}/**/*.png"], [str(linked_tree)], [f"{linked_tree}/*"]):
        found = _bounded(lambda inputs=inputs: find_image_inputs(inputs))[0]["value"]
        assert sorted(p for p in found.paths if "alias" not in p) == expected, inputs  # each image once
        skipped = {os.path.basename(item.path): item.reason for item in found.skipped}
        assert skipped["stolen.png"] == f"symbolic link leading outside {linked_tree}: not followed"
        for link in ("to_root", "to_outside"):
            assert skipped[link] == "symbolic link to a folder: not followed", (inputs, skipped)
    found = find_image_inputs([f"{linked_tree}/**/*.png"])
    assert str(linked_tree / "alias.png") in found.paths  # a link that stays inside its root is read
    assert "loop" in {os.path.basename(item.path) for item in found.skipped}


def test_predict_on_a_glob_over_a_link_to_the_root_scores_each_image_once(linked_tree, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    argv = ["predict", f"{linked_tree}/**/*.png", "--model", tiny_model_dir, "--output", str(output), "--quiet"]
    outcome, _ = _bounded(lambda: main(argv), seconds=300)
    assert outcome["value"] == 3  # finished; the links are reported as skipped
    summary = json.loads((output / "predictions.json").read_text())
    scored = sorted(os.path.relpath(row["path"], linked_tree) for row in summary["predictions"])
    assert scored == ["alias.png", "sub/part_0.png", "sub/part_1.png"]
    assert {os.path.basename(item["path"]) for item in summary["skipped"]} == {
        "to_root",
        "to_outside",
        "loop",
        "stolen.png",
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_device_among_the_inputs_is_skipped_by_name_never_opened(tiny_model_dir, tmp_path):
    """Opening a FIFO blocks until a writer comes, and /dev/zero never ends: such inputs are reported, not read."""
    root = tmp_path / "dir"
    write_test_images(root, count=2)
    os.mkfifo(root / "pipe.png")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{root / 'pipe.png'}\n/dev/zero\n{root / 'part_0.png'}\n")
    runs = {
        "folder": [str(root)],
        "glob": [f"{root}/*.png"],
        "list": ["--paths-from", str(listed)],
    }
    for name, inputs in runs.items():
        output = tmp_path / f"out-{name}"
        argv = ["predict", *inputs, "--model", tiny_model_dir, "--output", str(output), "--quiet", "--no-overlays"]
        outcome, _ = _bounded(lambda argv=argv: main(argv), seconds=120)
        assert outcome.get("value") == 3, (name, outcome)  # finished, with skipped inputs
        summary = json.loads((output / "predictions.json").read_text())
        skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
        assert "not a regular file" in skipped[str(root / "pipe.png")], (name, skipped)
        if name == "list":
            assert "not a regular file" in skipped["/dev/zero"], skipped
        scored = {os.path.basename(row["path"]) for row in summary["predictions"]}
        assert scored == ({"part_0.png"} if name == "list" else {"part_0.png", "part_1.png"}), (name, scored)

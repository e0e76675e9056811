"""cnnlab serve, tested as people use it: a server started as a subprocess on a free loopback port
answers what `cnnlab predict` answers, refuses every kind of bad upload with a one-line 4xx and
stays healthy with its memory bounded, batches concurrent requests and fails none of them under a
bounded load, serves a page that works in headless Chromium, serves .onnx files (int8 too), and
stops cleanly on SIGTERM."""
import asyncio
import http.client
import io
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_one_line_error, cnnlab_here, launch_chromium, require_chromium

pytest.importorskip("fastapi", reason="cnnlab serve needs fastapi, uvicorn and python-multipart")


class Server:
    """``cnnlab serve MODEL --port 0 ARGS`` in the background, and requests to it."""

    def __init__(self, model, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(model), "--port", "0",
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline()  # printed once the model is loaded and the port bound
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.first_line)
        if not found:
            self.proc.kill()
            raise AssertionError(self.first_line + self.proc.stderr.read())
        self.port = int(found.group(1))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /health")

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, files, query="", field="file"):
        """POST /predict with ``files``: (name, bytes) pairs, each in a ``field`` field."""
        body, kind = multipart([(field, name, data) for name, data in files])
        return self.request("POST", "/predict" + query, body, {"Content-Type": kind})

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def multipart(parts) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name or None for a text field, bytes) parts."""
    boundary = uuid.uuid4().hex
    body = b""
    for field, name, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{name}"' if name is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` pixels and holds almost none: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def server(trained_run):
    """The shared pool-bn run served with a 1 MB upload limit."""
    running = Server(trained_run.dir, "--max-upload-mb", "1", "--threads", "1")
    yield running
    running.stop()


def image_bytes(trained_run, cls=0, index=0) -> bytes:
    return (trained_run.data / f"class_{cls}" / f"img_{index:03d}.png").read_bytes()


def test_predict_answers_what_cnnlab_predict_prints(server, trained_run):
    from cnnlab.predict import predict
    paths = [trained_run.data / "class_0" / "img_000.png", trained_run.data / "class_2" / "img_001.png"]
    status, answer = server.post([(p.name, p.read_bytes()) for p in paths], "?top=2")
    assert status == 200, answer
    assert answer["model"]["name"] == "pool-bn" and re.fullmatch(r"[0-9a-f]{12}", answer["model"]["version"])
    expected = predict([str(p) for p in paths], str(trained_run.dir), top=2)
    assert [p["file"] for p in answer["predictions"]] == ["img_000.png", "img_001.png"]
    for got, want in zip(answer["predictions"], expected):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in want["top"]], abs=1e-5)
    status, answer = server.post([("a.png", image_bytes(trained_run))])
    assert len(answer["predictions"][0]["top"]) == 3  # --top 5, and the run has 3 classes


def test_metadata_and_health_say_what_runs(server, trained_run):
    status, meta = server.get("/metadata")
    config = json.loads((trained_run.dir / "config.json").read_text())
    metrics = json.loads((trained_run.dir / "metrics.json").read_text())
    assert status == 200 and meta["classes"] == config["class_names"] and meta["input_size"] == 32
    assert meta["metrics"]["test_accuracy"] == metrics["test_accuracy"] and meta["gradcam"] is True
    assert meta["preprocessing"]["size"] == 32 and meta["limits"]["max_upload_mb"] == 1
    assert meta["batching"] == {"delay_ms": 5, "max_batch": 32}  # 32x32 inputs: calls of up to 32 images
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["model"]["name"] == "pool-bn"


def test_gradcam_overlays_come_with_a_run(server, trained_run):
    status, answer = server.post([("a.png", image_bytes(trained_run))], "?gradcam=1")
    assert status == 200, answer
    uri = answer["predictions"][0]["gradcam"]
    assert uri.startswith("data:image/png;base64,")
    import base64
    overlay = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert overlay.size == (256, 256) and overlay.mode == "RGB"  # 32 pixels enlarged 8 times


def bad_uploads(trained_run) -> list:
    """(what, request arguments for Server.post or a raw request, expected status, fragment of the detail)."""
    photo = image_bytes(trained_run)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((256, 256)).save(jpeg, format="JPEG")  # its header whole in the first half
    return [
        ("text", dict(files=[("notes.txt", b"not an image at all\n" * 10)]), 415, "is not an image"),
        ("truncated png", dict(files=[("cut.png", photo[:len(photo) // 2])]), 422, "damaged or truncated"),
        ("truncated jpeg", dict(files=[("cut.jpg", jpeg.getvalue()[:len(jpeg.getvalue()) // 2])]), 422, "truncated"),
        ("empty", dict(files=[("empty.png", b"")]), 422, "is empty"),
        ("bomb (Pillow's limit)", dict(files=[("bomb.png", png_header(30_000, 30_000))]), 413, "decompression bomb"),
        ("bomb (Pillow's warning)", dict(files=[("bomb.png", png_header(10_000, 10_000))]), 413, "decompression bomb"),
        ("bomb (the server's limit)", dict(files=[("big.png", png_header(9_000, 9_000))]), 413, "9000 x 9000 pixels"),
        ("over --max-upload-mb", dict(files=[("big.png", b"\0" * 1_100_000)]), 413, "over --max-upload-mb 1"),
        ("wrong field", dict(files=[("a.png", photo)], field="image"), 422, "no field named 'file'"),
        ("too many files", dict(files=[("a.png", photo)] * 65), 400, "Too many files"),
        ("Grad-CAM for too many", dict(files=[("a.png", photo)] * 5, query="?gradcam=1"), 413, "at most 4 images"),
        ("bad top", dict(files=[("a.png", photo)], query="?top=0"), 400, "?top="),
        ("bad flag", dict(files=[("a.png", photo)], query="?gradcam=maybe"), 400, "?gradcam="),
    ]


def assert_one_line_4xx(status, answer, expected, fragment, what):
    assert status == expected, (what, status, answer)
    detail = answer["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 400, (what, detail)
    assert fragment in detail, (what, detail)


def test_every_bad_upload_is_a_one_line_4xx_and_the_server_stays_healthy(server, trained_run):
    cases = bad_uploads(trained_run)
    for what, kwargs, expected, fragment in cases:
        assert_one_line_4xx(*server.post(**kwargs), expected, fragment, what)
    body, kind = multipart([("file", None, b"plain text")])
    raw = [("text in the file field", ("POST", "/predict", body, {"Content-Type": kind}), 422, "holds text"),
           ("not multipart", ("POST", "/predict", b'{"file": 1}', {"Content-Type": "application/json"}), 415,
            "not multipart/form-data"),
           ("no boundary", ("POST", "/predict", b"x", {"Content-Type": "multipart/form-data"}), 400, "boundary"),
           ("GET /predict", ("GET", "/predict"), 405, "Method Not Allowed"),
           ("no such page", ("GET", "/admin"), 404, "Not Found")]
    for what, args, expected, fragment in raw:
        assert_one_line_4xx(*server.request(*args), expected, fragment, what)
    before = server.rss_mb()
    for _ in range(4):  # memory stays bounded: the same bad uploads again leave it where it was
        for what, kwargs, expected, fragment in cases:
            assert server.post(**kwargs)[0] == expected, what
    assert server.rss_mb() - before < 100, (before, server.rss_mb())
    assert server.get("/health")[1]["status"] == "ok"
    status, answer = server.post([("a.png", image_bytes(trained_run))])
    assert status == 200 and answer["predictions"][0]["top"]


def test_an_upload_over_the_limit_is_refused_as_it_streams(server):
    """No Content-Length (chunked) and a body that never ends: the server counts the bytes and
    answers 413 once they pass 1 MB, without waiting for the rest."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n")
        for _ in range(12):  # 1.2 MB, and the body is never finished
            sock.sendall(b"%x\r\n" % 100_000 + b"\0" * 100_000 + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            assert part, reply
            reply += part
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert_one_line_4xx(413, json.loads(body), 413, "over --max-upload-mb 1", "chunked")
    assert server.get("/health")[0] == 200


def load(port, body, kind, requests, concurrency) -> tuple[int, list]:
    """``requests`` POSTs from ``concurrency`` threads on keep-alive connections: (answered, failures)."""
    lock, answered, failures = threading.Lock(), [0], []
    left = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if next(left, None) is None:
                    break
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = conn.getresponse()
                data = response.read()
                ok = response.status == 200 and len(json.loads(data)["predictions"]) == 1
            except (OSError, http.client.HTTPException, ValueError) as exc:
                ok, data = False, repr(exc)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                answered[0] += 1
                if not ok:
                    failures.append(data)
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answered[0], failures


def test_a_bounded_load_fails_no_request_and_is_batched(server, trained_run):
    body, kind = multipart([("file", "a.png", image_bytes(trained_run, 1, 3))])
    calls = server.get("/health")[1]["model_calls"]
    answered, failures = load(server.port, body, kind, 200, 16)
    assert answered == 200 and failures == [], failures[:3]
    health = server.get("/health")[1]
    assert health["status"] == "ok" and health["waiting"] == 0
    assert health["model_calls"] - calls < 200  # concurrent requests shared model calls


def test_the_page_classifies_a_photo_in_chromium(server, trained_run, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright
    photo = trained_run.data / "class_2" / "img_004.png"
    expected = server.post([(photo.name, photo.read_bytes())])[1]["predictions"][0]["top"]
    origin = f"http://127.0.0.1:{server.port}"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(origin + "/")
        # locators, not wait_for_function: the page's Content-Security-Policy forbids eval, as it should
        page.locator("#model", has_text="pool-bn").wait_for()
        page.set_input_files("#file", str(photo))  # picked
        page.wait_for_selector("#classes .class")
        names = page.eval_on_selector_all("#classes .class .name span:first-child", "s => s.map(e => e.textContent)")
        shown = page.eval_on_selector_all("#classes .probability", "s => s.map(e => e.textContent)")
        widths = page.eval_on_selector_all("#classes .fill", "s => s.map(e => e.getBoundingClientRect().width)")
        page.locator("#gradcam-figure:not(.hidden)").wait_for()
        overlay = page.evaluate("[getComputedStyle(document.querySelector('#gradcam-figure')).display, "
                                "document.querySelector('#gradcam').naturalWidth]")
        dropped = (trained_run.data / "class_0" / "img_002.png").read_bytes()  # dropped
        page.evaluate("""b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer(); dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            document.querySelector("#drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                                                   cancelable: true})); }""",
                      __import__("base64").b64encode(dropped).decode())
        page.locator("#status", has_text="dropped.png: class_").wait_for()
        page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"no image"}])
        page.locator("#error", has_text="is not an image").wait_for()
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert names == [t["class"] for t in expected]
    assert shown == [f"{100 * t['probability']:.2f}%" for t in expected]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert overlay[0] != "none" and overlay[1] == 256
    assert not [e for e in errors if "status of 415" not in e], errors  # the refused text file's 415 aside
    assert all(u.startswith((origin + "/", "blob:", "data:")) for u in requests), requests


def test_an_onnx_file_is_served_and_sigterm_stops_it_cleanly(trained_run, tmp_path):
    from cnnlab.export import export_run
    model = export_run(trained_run.dir, tmp_path / "pool-bn-int8.onnx", int8=True, log=lambda m: None)
    running = Server(model)
    try:
        status, meta = running.get("/metadata")
        assert meta["model"]["kind"] == "onnx" and meta["model"]["name"] == "pool-bn-int8"
        assert "int8" in meta["quantization"] and meta["gradcam"] is False and meta["metrics"] is None
        status, answer = running.post([("a.png", image_bytes(trained_run, 1, 0))])
        assert status == 200 and len(answer["predictions"][0]["top"]) == 3
        assert_one_line_4xx(*running.post([("a.png", image_bytes(trained_run))], "?gradcam=1"), 400,
                            "Grad-CAM needs the PyTorch run", "gradcam on onnx")
    finally:
        code, out, err = running.stop()
    assert code == 0, err
    assert "stopped by SIGTERM: 1 requests answered" in out, out
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", running.port))


def test_serve_refuses_bad_command_lines_in_one_line(trained_run, tmp_path, capsys):
    """Refused before the server starts: run in this process (`cnnlab_here`, the same output)."""
    assert_one_line_error(cnnlab_here(capsys, "serve", tmp_path / "nothing"), "is neither a run directory")
    unfinished = shutil.copytree(trained_run.dir, tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    assert_one_line_error(cnnlab_here(capsys, "serve", unfinished), "not a finished run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cnnlab_here(capsys, "serve", "--model", trained_run.dir, "--port", taken.getsockname()[1])
        assert_one_line_error(result, "cannot listen on 127.0.0.1")
    assert_one_line_error(cnnlab_here(capsys, "serve", trained_run.dir, "--host", "no-such-host.invalid"), "--host")
    assert_one_line_error(cnnlab_here(capsys, "serve", trained_run.dir, "--max-upload-mb", "0"),
                          "--max-upload-mb must be above 0")
    assert_one_line_error(cnnlab_here(capsys, "serve", trained_run.dir, "--model", trained_run.dir), "not both")


def test_the_batcher_shares_calls_and_splits_their_answers():
    import numpy as np
    import torch

    from cnnlab.serve import Batcher
    calls = []

    def classify(images):
        calls.append(len(images))
        return np.stack([images.float().mean((1, 2, 3)).numpy()] * 2, axis=1)

    async def burst(delay):
        batcher = Batcher(classify, delay, max_batch=8)
        await batcher.start()
        batcher.arriving = 1  # more requests on their way: a batch waits for them up to the delay
        first = asyncio.create_task(batcher.submit(torch.full((1, 3, 2, 2), 1, dtype=torch.uint8)))
        await asyncio.sleep(0)
        rest = [batcher.submit(torch.full((n, 3, 2, 2), v, dtype=torch.uint8)) for n, v in ((2, 2), (3, 3), (4, 4))]
        answers = await asyncio.gather(first, *rest)
        batcher.arriving = 0
        await batcher.stop()
        return [a[:, 0].tolist() for a in answers]
    assert asyncio.run(burst(0.05)) == [[1.0], [2.0, 2.0], [3.0, 3.0, 3.0], [4.0] * 4]
    assert calls == [6, 4]  # 1 + 2 + 3 in one call; 4 more would pass --max-batch 8, so the next call
    calls.clear()
    assert asyncio.run(burst(0)) == [[1.0], [2.0, 2.0], [3.0, 3.0, 3.0], [4.0] * 4]
    assert calls == [1, 2, 3, 4]  # no batching: a call a request


def test_a_multi_label_run_answers_every_label_at_or_above_its_threshold(tmp_path):
    from conftest import cnnlab, make_folder
    from cnnlab.predict import predict
    data = make_folder(tmp_path / "data", classes=3, per_class=10)
    rows = ["image,label"] + [f"{p.relative_to(data)},{p.parent.name}" + (";class_0" if i % 2 else "")
                              for i, p in enumerate(sorted(data.rglob("*.png")))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    done = cnnlab("train", "--model", "conv", "--multi-label", "--data", data, "--labels", tmp_path / "labels.csv",
                  "--epochs", "2", "--batch-size", "8", "--threads", "1", "--out", tmp_path / "runs", "--name", "ml")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "ml"
    served = Server(run, "--threads", "1")
    try:
        photo = data / "class_1" / "img_000.png"
        status, answer = served.post([(photo.name, photo.read_bytes())])
        _, meta = served.get("/metadata")
    finally:
        served.stop()
    (expected,) = predict([str(photo)], str(run))
    got = answer["predictions"][0]
    assert status == 200 and meta["multi_label"] is True and len(meta["thresholds"]) == 3
    assert [t["class"] for t in got["labels"]] == [t["class"] for t in expected["labels"]]
    assert [t["probability"] for t in got["labels"]] == pytest.approx([t["probability"] for t in expected["labels"]],
                                                                      abs=1e-5)
    assert sum(t["probability"] for t in got["top"]) != pytest.approx(1.0)  # sigmoids, not a softmax

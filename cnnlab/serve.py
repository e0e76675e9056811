"""`cnnlab serve`: a finished run or an exported .onnx file behind HTTP (FastAPI on uvicorn).

``POST /predict`` takes images (multipart form, field ``file``, repeatable) and answers their top
classes as JSON; ``GET /`` is a page to try it from a browser; ``GET /health`` and ``GET /metadata``
say that it runs and what it serves. Requests that arrive together share one model call: the first
waits up to --batch-delay-ms for others (up to --max-batch images), and the call runs on the model's
own thread, so the event loop keeps taking requests. Bad input is a 4xx with a one-line JSON
``detail``, never a crash; every upload is bounded (--max-upload-mb, files, pixels, time), and so is
what waits in memory. SIGTERM or Ctrl-C: in-flight requests finish, the port is freed, exit code 0."""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) as objects
import asyncio
import base64
import contextlib
import ipaddress
import os
import signal
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import ServeConfig, validate_serve
from .errors import CnnlabError
from .serve_model import MAX_PIXELS, ServedModel, UploadError, decode_upload, upload_name

MAX_FILES = 64  # images a request
MAX_GRADCAM = 4  # images a request may ask Grad-CAM overlays for (each costs a backward pass)
MAX_WAITING = 512  # images decoded and waiting for the model; past it a request is told to retry (503)
READERS = 16  # requests whose bodies are read, parsed and decoded at once: the memory that takes is bounded
DECODERS = min(4, os.cpu_count() or 2)  # images decoded at once (each up to MAX_PIXELS: about 200 MB decoded)
READ_SECONDS = 30  # a body not received in that time is refused (408): a slow client holds no reader long
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
USAGE = "send images as multipart/form-data, each in a field named 'file' (curl -F file=@photo.jpg URL/predict)"


class Batcher:
    """Requests' images gathered into one model call: the first waits up to ``delay`` seconds (0: no
    waiting, one call a request) for others, up to ``max_batch`` images, but only while some request
    is still being read or decoded (``arriving``): a lone request waits for nothing. Calls run one at
    a time on a thread of their own."""

    def __init__(self, classify: Callable[[torch.Tensor], np.ndarray], delay: float, max_batch: int):
        self.classify, self.delay, self.max_batch = classify, delay, max_batch
        self.waiting, self.arriving, self.calls, self._task, self._carry = 0, 0, 0, None, None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cnnlab-model")

    async def start(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn, *args):
        """``fn(*args)`` on the model's thread, between batches (Grad-CAM uses it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        """The class probabilities of ``images``, from a model call shared with other requests."""
        if self.waiting + len(images) > MAX_WAITING:
            raise UploadError(503, f"the server is busy ({self.waiting} images wait for the model); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.waiting += len(images)
        self.queue.put_nowait((images, future))
        try:
            return await future
        finally:
            self.waiting -= len(images)

    async def _gather(self) -> list:
        """The next batch: one request's images, and those of requests that arrive within the delay."""
        items = [self._carry] if self._carry is not None else [await self.queue.get()]
        self._carry = None
        count, deadline = len(items[0][0]), time.monotonic() + self.delay
        while self.delay > 0 and count < self.max_batch:
            while not self.queue.empty() and count < self.max_batch:
                item = self.queue.get_nowait()
                if count + len(item[0]) > self.max_batch:
                    self._carry = item  # the next batch's first
                    return items
                items.append(item)
                count += len(item[0])
            left = deadline - time.monotonic()
            if left <= 0 or count >= self.max_batch or (not self.arriving and self.queue.empty()):
                break
            await asyncio.sleep(min(left, self.delay / 4))
        return items

    async def _loop(self) -> None:
        while True:
            items = await self._gather()
            live = [(images, future) for images, future in items if not future.done()]  # a client gone: skipped
            if not live:
                continue
            try:
                probs = await self.run(self.classify, torch.cat([images for images, _ in live]))
                self.calls += 1
            except Exception as exc:  # noqa: BLE001 - each waiting request answers it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for images, future in live:
                if not future.done():
                    future.set_result(probs[start:start + len(images)])
                start += len(images)


async def _body(request, limit: int) -> bytes:
    """The request's body, refused (413) once it is past ``limit`` bytes: by its Content-Length
    before any byte is read, else as the bytes are counted."""
    too_big = f"the upload is over --max-upload-mb {limit / 1e6:g}; send smaller or fewer images a request"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise UploadError(400, "the Content-Length header is not a number; send a well-formed request")
        if int(length) > limit:
            raise UploadError(413, too_big)
    body = bytearray()
    try:
        async with asyncio.timeout(READ_SECONDS):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise UploadError(413, too_big)
    except TimeoutError:
        raise UploadError(408, f"the upload did not arrive within {READ_SECONDS} s; send it again") from None
    return bytes(body)


async def _files(request, limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file in the request's ``file`` fields, or a one-line refusal."""
    from starlette.requests import Request
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        raise UploadError(415, f"the request is not multipart/form-data; {USAGE}")
    if "boundary=" not in kind:
        raise UploadError(400, f"the multipart request names no boundary; {USAGE}")
    body = await _body(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    form = await Request(request.scope, replay).form(max_files=MAX_FILES, max_fields=MAX_FILES)
    try:
        given = form.getlist("file")
        if not given:
            fields = ", ".join(sorted({upload_name(k) for k in form.keys()})[:5]) or "none"
            raise UploadError(422, f"no field named 'file' in the form (its fields: {fields}); {USAGE}")
        if any(isinstance(f, str) for f in given):
            raise UploadError(422, f"the field 'file' holds text, not a file; {USAGE}")
        return [(upload_name(f.filename), await f.read()) for f in given]
    finally:
        await form.close()


def _flag(request, name: str) -> bool:
    value = request.query_params.get(name, "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no", ""):
        raise UploadError(400, f"?{name}= takes 1 or 0 (true or false), not '{upload_name(value)}'")
    return value in ("1", "true", "yes")


def _top(request, default: int, classes: int) -> int:
    text = request.query_params.get("top")
    if text is None:
        return min(default, classes)
    if not text.isdigit() or int(text) < 1:
        raise UploadError(400, f"?top= takes a whole number of classes from 1, not '{upload_name(text)}'")
    return min(int(text), classes)


def create_app(model: ServedModel, cfg: ServeConfig, log_error: Callable[[str], None] = print):
    """The FastAPI application serving ``model`` with ``cfg``'s limits and batching."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    batcher = Batcher(model.classify, cfg.batch_delay_ms / 1000, cfg.max_batch or model.batch)
    readers = asyncio.Semaphore(READERS)
    decoders = ThreadPoolExecutor(DECODERS, thread_name_prefix="cnnlab-decode")
    limit = int(cfg.max_upload_mb * 1_000_000)
    page = resources.files("cnnlab").joinpath("serve_page.html").read_text(encoding="utf-8")
    stats = {"requests": 0, "images": 0, "refused": 0, "started": time.time()}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="cnnlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.stats = batcher, stats

    @app.exception_handler(UploadError)
    async def refused(request, exc: UploadError):
        stats["refused"] += 1
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # 404, 405, and the form parser's 400s: one line
        stats["refused"] += 1
        return JSONResponse({"detail": " ".join(str(exc.detail).split())}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):  # a bug or an exhausted machine: this request fails, the server goes on
        log_error(f"cnnlab serve: error answering {request.method} {request.url.path}: {type(exc).__name__}: "
                  f"{' '.join(str(exc).split())[:300]}")
        return JSONResponse({"detail": f"the server could not answer ({type(exc).__name__}); it keeps running, "
                                       "retry or report it"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        stats["refused"] += 1
        return JSONResponse({"detail": f"the request does not fit this endpoint; {USAGE}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.describe(), "requests": stats["requests"], "images": stats["images"],
                "refused": stats["refused"], "waiting": batcher.waiting, "model_calls": batcher.calls,
                "uptime_s": round(time.time() - stats["started"], 1)}

    @app.get("/metadata")
    async def metadata():
        return {**model.metadata(), "limits": {"max_upload_mb": cfg.max_upload_mb, "max_files": MAX_FILES,
                                               "max_pixels": MAX_PIXELS, "max_gradcam": MAX_GRADCAM},
                "batching": {"delay_ms": cfg.batch_delay_ms, "max_batch": batcher.max_batch}, "top": cfg.top}

    @app.post("/predict")
    async def predict(request: Request):
        top, gradcam = _top(request, cfg.top, len(model.classes)), _flag(request, "gradcam")
        if gradcam and not model.explains:
            raise UploadError(400, "Grad-CAM needs the PyTorch run; this server runs an .onnx file (drop ?gradcam=1)")
        batcher.arriving += 1  # a batch being gathered waits for this request's images
        try:
            async with readers:
                files = await _files(request, limit)
                if gradcam and len(files) > MAX_GRADCAM:
                    raise UploadError(413, f"Grad-CAM is drawn for at most {MAX_GRADCAM} images a request; send fewer")
                names = [name for name, _ in files]
                loop = asyncio.get_running_loop()
                arrays = [await loop.run_in_executor(decoders, decode_upload, data, name, model.size)
                          for name, data in files]
                del files
        finally:
            batcher.arriving -= 1
        images = torch.from_numpy(np.stack(arrays))
        probs = await batcher.submit(images)
        answer = []
        for name, p in zip(names, probs):
            order = np.argsort(-p, kind="stable")
            answer.append({"file": name, "top": [{"class": model.classes[i], "probability": float(p[i])}
                                                 for i in order[:top]]})
            if model.thresholds is not None:  # several labels per image: every one at or above its threshold
                answer[-1]["labels"] = [{"class": model.classes[i], "probability": float(p[i])}
                                        for i in order if p[i] >= model.thresholds[i]]
        if gradcam:
            for item, png in zip(answer, await batcher.run(model.explain, images)):
                item["gradcam"] = "data:image/png;base64," + base64.b64encode(png).decode()
        stats["requests"] += 1
        stats["images"] += len(images)
        return {"model": model.describe(), "predictions": answer}

    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, or a one-line error (the address in use, not this machine's)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise CnnlabError(f"--host {host} is not an address or a name this machine resolves; pass 127.0.0.1 (this "
                          "machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = "pass another --port (0: any free one)" if port else "pass another --host"
        raise CnnlabError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}") from None
    sock.set_inheritable(False)
    return sock


def serve(cfg: ServeConfig, log: Callable[[str], None] = print, log_error: Callable[[str], None] = print) -> int:
    """Serves ``cfg.model`` until SIGTERM or Ctrl-C; returns the number of requests answered."""
    try:
        import uvicorn
    except ImportError:
        raise CnnlabError("cnnlab serve needs fastapi, uvicorn and python-multipart: pip install fastapi uvicorn "
                          "python-multipart") from None
    validate_serve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = ServedModel(cfg.model, threads=cfg.threads)
    app = create_app(model, cfg, log_error)
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's warning of a bomb refuses it
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    log(f"serving {model.name} (version {model.version}, {len(model.classes)} classes, {model.size}x{model.size}) at "
        f"http://{shown_host}:{port}/ : the page at /, POST /predict, GET /health, GET /metadata; Ctrl-C or SIGTERM "
        "stops it")
    if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
        log(f"notice: --host {cfg.host} lets every machine that reaches this one use the model, without a password")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=256,
                                           timeout_graceful_shutdown=10, server_header=False))
    caught = []
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:  # uvicorn takes both signals while it runs, then passes them on: to the handler above, which ends quietly
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    stats = app.state.stats
    log(f"stopped{' by ' + signal.Signals(caught[0]).name if caught else ''}: {stats['requests']} requests answered "
        f"({stats['images']} images in {app.state.batcher.calls} model calls), {stats['refused']} refused")
    return stats["requests"]


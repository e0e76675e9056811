"""`cnnlab serve` under load on the loopback address: requests/s and p50/p99 latency at several
concurrencies, with batching (--batch-delay-ms 5, the default) and without (0), side by side.

    python bench/serve_load.py --model runs/transfer-efficientnet_lite0 --image cat.jpg \
        --requests 2000 --concurrency 1,8,32

One server is started per batching setting (`cnnlab serve MODEL --port 0`, each in its own process),
and each concurrency level is run against each server in turn, so both see the same machine. A
request is one POST /predict of --image; it fails unless the answer is 200 with one prediction.
The clients are threads of this process with keep-alive connections: on a small machine they take
CPU from the server, as any load generator on the same machine would."""
from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def multipart(image: Path) -> tuple[bytes, str]:
    """The body and content type of a POST /predict of ``image``."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(model: str, delay: float, extra: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", model, "--port", "0", "--batch-delay-ms",
                             str(delay), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, int(found.group(1))


def get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def load(port: int, body: bytes, kind: str, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads: rate, latencies, failures."""
    latencies, failures, lock = [], [], threading.Lock()
    left = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if next(left, None) is None:
                    break
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = conn.getresponse()
                answer = response.read()
                ok = response.status == 200 and len(json.loads(answer)["predictions"]) == 1
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                ok, answer = False, repr(exc).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    failures.append(answer[:200])
        conn.close()

    calls = get(port, "/health")["model_calls"]
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    calls = get(port, "/health")["model_calls"] - calls
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"rate": len(latencies) / seconds, "p50": q[49] * 1000, "p99": q[98] * 1000, "failed": len(failures),
            "batch": requests / max(calls, 1), "first_failure": failures[0] if failures else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run directory or an .onnx file")
    parser.add_argument("--image", required=True, type=Path, help="the photo every request sends")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--delays", default="5,0", help="--batch-delay-ms of each server (0: no batching)")
    parser.add_argument("--threads", type=int, help="--threads of the servers")
    args = parser.parse_args()
    extra = ["--threads", str(args.threads)] if args.threads else []
    body, kind = multipart(args.image)
    servers = {float(d): start_server(args.model, float(d), extra) for d in args.delays.split(",")}
    try:
        for port in (p for _, p in servers.values()):  # warm-up: the first calls load kernels
            load(port, body, kind, 100, 4)
        print(f"{args.requests} requests of {args.image.name} ({len(body) / 1000:.0f} kB) to {args.model}")
        print(f"{'concurrency':>11} {'batch delay':>12} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'failed':>7} {'images/call':>12}")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for delay, (_, port) in servers.items():
                r = load(port, body, kind, args.requests, concurrency)
                print(f"{concurrency:>11} {f'{delay:g} ms' if delay else 'off':>12} {r['rate']:>11.1f} {r['p50']:>8.1f} "
                      f"{r['p99']:>8.1f} {r['failed']:>7} {r['batch']:>12.2f}", flush=True)
                if r["first_failure"]:
                    print(f"  first failure: {r['first_failure']!r}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

"""Load test of `imgclf serve`: 32 concurrent clients posting real CIFAR-10 test images.

The server runs in its own process on loopback; this process is the client (httpx.AsyncClient),
so client CPU never lands in the server's event loop; the clients are lean keep-alive HTTP/1.1
connections (see Conn) on uvloop when it is installed. Two rounds: batching on (--max-batch 32)
and off (--max-batch 1). Prints one JSON line: requests/s, p50/p99 latency and errors for each,
and the throughput ratio.

    python benchmarks/serve_load.py                 # trains a quick default fastnet run first
    python benchmarks/serve_load.py --run runs/x --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def test_images(data: str | None, tmp: Path, limit: int = 2000) -> tuple[list[bytes], str]:
    if data:
        root = Path(data)
    elif (SHARED / "cifar10-jpeg.tar.gz").exists():
        with tarfile.open(SHARED / "cifar10-jpeg.tar.gz") as t:
            members = [m for m in t.getmembers() if "/test/" in f"/{m.name}" and m.name.endswith(".jpg")]
            t.extractall(tmp, members=members, filter="data")
        root = tmp
    else:
        from imgclf.sample import sample_dir

        root = sample_dir()
    files = sorted(root.rglob("test/*/*.jpg")) or sorted(root.rglob("*.jpg"))
    if not files:
        sys.exit(f"no .jpg test images under {root}")
    random.Random(0).shuffle(files)
    return [f.read_bytes() for f in files[:limit]], str(root)


def default_run(tmp: Path, epochs: float) -> Path:
    import imgclf
    from imgclf.sample import sample_dir

    res = imgclf.train(data=str(sample_dir()), epochs=epochs, project=str(tmp / "runs"), name="serve-bench",
                       progress=False, tensorboard=False)
    return res.run_dir


def start_server(model: str, port: int, max_batch: int, max_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imgclf", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not come up in 180 s")


class Conn:
    """One keep-alive HTTP/1.1 connection posting raw image bytes.

    Written by hand (70 lines) because the load generator shares the 2 cores with the server:
    httpx spends more CPU per request than the server does, and would measure itself.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port, self.r, self.w = host, port, None, None

    async def post(self, path: str, body: bytes) -> int:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.w.write(head + body)
            status_line = await self.r.readuntil(b"\r\n")
            length, close = 0, False
            while True:
                line = await self.r.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                k, _, v = line.decode("latin-1").partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            await self.r.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            raise
        if close:
            self.close()
        return int(status_line.split()[1])

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


async def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    host, port = url.removeprefix("http://").split(":")
    conns = [Conn(host, int(port)) for _ in range(clients)]

    async def one(conn: Conn, i: int, record: bool) -> None:
        t0 = time.perf_counter()
        try:
            status = await asyncio.wait_for(conn.post("/v1/predict", images[i % len(images)]), 30)
            key = None if status == 200 else f"HTTP {status}"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            conn.close()
            key = type(e).__name__
        if record:
            if key is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1

    async def client(k: int, until: float, record: bool) -> None:
        i = k * 997
        while time.perf_counter() < until:
            await one(conns[k], i, record)
            i += 1

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        warm_until = time.perf_counter() + min(3.0, seconds / 5)
        await asyncio.gather(*(client(k, warm_until, False) for k in range(clients)))
        before = (await c.get("/metrics")).text
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, t0 + seconds, True) for k in range(clients)))
        elapsed = time.perf_counter() - t0
        after = (await c.get("/metrics")).text
    for conn in conns:
        conn.close()
    lat = np.asarray(latencies) * 1000
    passes = _metric(after, "imgclf_batch_size_count") - _metric(before, "imgclf_batch_size_count")
    imgs = _metric(after, "imgclf_batch_size_sum") - _metric(before, "imgclf_batch_size_sum")
    return {
        "requests_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "errors": sum(errors.values()), "error_kinds": errors, "requests": len(lat),
        "mean_batch": round(imgs / passes, 2) if passes else None,
    }


def _run(coro):
    # The load generator's own GC pauses would be counted as server latency: collect once, then
    # keep the collector off while requests are timed.
    gc.collect()
    gc.disable()
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
    finally:
        gc.enable()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder or .onnx file to serve (default: train a quick fastnet run)")
    ap.add_argument("--data", help="folder with CIFAR-10 test/<class>/*.jpg (default: ../shared/datasets tarball)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per round")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--epochs", type=float, default=4, help="epochs of the quick run trained without --run")
    ap.add_argument("--onnx", action="store_true", help="export the run to ONNX (with its parity check) and serve that")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    from imgclf.deploy.server import free_port

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp_s:
        tmp = Path(tmp_s)
        model = args.run or str(default_run(tmp, args.epochs))
        if args.onnx and not model.endswith(".onnx"):
            from imgclf.deploy.export import export

            model = export(model, "onnx", tmp / "model.onnx", verbose=False)["file"]
        images, origin = test_images(args.data, tmp)
        out: dict = {"benchmark": "serve_load", "model": model, "images": f"{len(images)} CIFAR-10 test JPEGs from {origin}",
                     "clients": args.clients, "seconds": args.seconds, "cpus": os.cpu_count(),
                     "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
        for name, max_batch in (("batched", args.max_batch), ("batch1", 1)):
            port = args.port or free_port()
            proc = start_server(model, port, max_batch, args.max_wait_ms)
            try:
                out[name] = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms,
                             **_run(load(f"http://127.0.0.1:{port}", images, args.clients, args.seconds))}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        b, s = out["batched"]["requests_per_s"], out["batch1"]["requests_per_s"]
        out["throughput_ratio"] = round(b / s, 2) if s else None
        out["targets_met"] = {"zero_errors": out["batched"]["errors"] == 0 and out["batch1"]["errors"] == 0,
                              "p99_under_100ms": (out["batched"]["p99_ms"] or 1e9) < 100,
                              "batching_2x": (out["throughput_ratio"] or 0) >= 2}
        print(json.dumps(out))


if __name__ == "__main__":
    main()

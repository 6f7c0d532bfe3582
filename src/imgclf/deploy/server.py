"""HTTP server for a trained run or an exported ONNX file: FastAPI + uvicorn.

Request path: the body is read under a size limit (ASGI middleware, before any parsing) ->
each image's header is read (size only, nothing decoded) to enforce the per-request pixel budget
and the in-flight cap -> images are decoded and resized in a thread pool (only a request whose
images total at most ``INLINE_DECODE_PIXELS`` decodes on the event loop) -> each image joins an
asyncio queue -> one collector takes up to ``max_batch`` images, waiting at most
``max_wait_ms`` for company -> a single inference thread runs the batch -> futures resolve.
Requests that arrive together therefore share one forward pass.

Bad input is always a 4xx with ``{"error": "..."}``; model files are read without unpickling
(safetensors + JSON for a run, protobuf for ONNX).
"""


import asyncio
import atexit
import gc
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.images import BadImage, _draft_request, load_resized
from imgclf.errors import UserError

STATIC = Path(__file__).parent / "static"
MB = 1 << 20
# A request is decoded on the event loop only when all its images together are at most this many
# pixels (read from the headers, never from the compressed size: a 5 KB PNG can be 40 MP) and its
# body at most INLINE_DECODE_BYTES; anything more goes to the decode thread pool.
INLINE_DECODE_PIXELS = 256 * 256
INLINE_DECODE_BYTES = 16 * 1024
RETRY_AFTER_S = 1  # the Retry-After of a 503 "busy"
# SIGTERM / Ctrl-C: requests in flight get this long to finish, then their connections are closed;
# without it one client that never finishes its upload holds the process up for as long as it likes
SHUTDOWN_GRACE_S = 10
# a worker process imports torch before it can answer its supervisor's health check: uvicorn's
# default 5 s kills and restarts workers that are only slow to start on a busy machine
WORKER_HEALTHCHECK_S = 60
MAX_WAIT_MS = 60_000  # a batching wait longer than a minute is a typo, not a setting
PRECISIONS = ("fp32", "auto", "bf16", "fp16")  # imgclf.api.load's; an ONNX export runs in fp32
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
MAX_TOP_K = 1000  # the most classes a request may ask for (query string or JSON body)


@dataclass
class ServeConfig:
    model: str
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000  # 40 MP: any real photo; a 20k x 20k "bomb" is refused before decoding
    max_images: int = 256  # per request
    decode_threads: int = 0  # 0: min(4, cpus + 1)
    top_k: int = 5
    device: str = "cpu"
    threads: int = 0  # inference threads; 0: cpus - 1, leaving a core to the event loop (HTTP parsing)
    max_in_flight: int = 0  # images being decoded, queued or classified at once; 0: 4 * max_images
    precision: str = "fp32"  # a run folder's: fp32 (the exported model's answers), auto, bf16 or fp16 autocast
    body_timeout_s: float = 30.0  # a client silent this long in the middle of its upload gets a 408
    # open connections at once (uvicorn's limit_concurrency), 0: no limit. The in-flight cap counts
    # images once their body is read; until then each upload holds up to max_body_mb of memory
    max_connections: int = 0

    def in_flight_limit(self) -> int:
        return self.max_in_flight or 4 * self.max_images

    def check(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {self.max_batch}")
        # nan passes any comparison; inf (or days) would hold every request, and so a graceful
        # shutdown, that long
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS):
            raise UserError(f"--max-wait-ms must be a finite number from 0 to {MAX_WAIT_MS}, got {self.max_wait_ms}")
        if not (math.isfinite(self.max_body_mb) and self.max_body_mb > 0):
            raise UserError(f"--max-body-mb must be a finite number > 0, got {self.max_body_mb}")
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise UserError(f"body_timeout_s must be a finite number > 0, got {self.body_timeout_s}")
        if self.max_connections < 0:
            raise UserError(f"--max-connections must be >= 0 (0: no limit), got {self.max_connections}")
        if self.max_pixels < 1:
            raise UserError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.max_images < 1:
            raise UserError(f"max_images (images per request) must be >= 1, got {self.max_images}")
        if self.decode_threads < 0:
            raise UserError(f"--decode-threads must be >= 0 (0: auto), got {self.decode_threads}")
        if self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.max_in_flight < 0 or 0 < self.max_in_flight < self.max_images:
            raise UserError(f"--max-in-flight must be 0 (auto) or >= the images per request ({self.max_images}), "
                            f"got {self.max_in_flight}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# --- backends ---------------------------------------------------------------------------------


class TorchBackend:
    """A run folder through imgclf.api.Classifier (model.json + model.safetensors)."""

    kind = "pytorch"

    def __init__(self, run: str | Path, device: str = "cpu", precision: str = "fp32"):
        from imgclf.api import load

        self.clf = load(run, device, precision)
        self.meta = dict(self.clf.meta)
        self.source = str(run)
        self.name = Path(run).resolve().name  # 'fast' for 'runs/fast/' or '.' run from inside it
        self.precision = precision

    def probs(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(images), dtype=np.float32)


class OnnxBackend:
    """An ``imgclf export`` ONNX file through onnxruntime; preprocessing and calibration are in
    the graph, size and resize policy in its metadata."""

    kind = "onnx"

    def __init__(self, path: str | Path, threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort

        from imgclf.deploy.export import read_onnx_metadata

        self.meta = read_onnx_metadata(path)
        providers = onnx_providers(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise UserError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        # onnxruntime drops a provider it cannot start (CUDA or cuDNN libraries missing) with only a
        # log line and runs on the CPU: asked for CUDA, that would be a silent CPU server
        if len(providers) > 1 and "CUDAExecutionProvider" not in self.sess.get_providers():
            raise UserError(f"--device {device}: onnxruntime could not start its CUDA provider (are the CUDA and "
                            "cuDNN libraries onnxruntime-gpu needs installed?); use --device cpu to serve on the CPU")
        self.source = str(path)
        # the run it was exported from: every export is a model.onnx, its run's folder tells them apart
        source_run = self.meta.get("source_run")
        self.name = Path(source_run).name if isinstance(source_run, str) and Path(source_run).name else Path(path).name
        self.precision = "fp32"

    def probs(self, images: np.ndarray) -> np.ndarray:
        return self.sess.run(["probs"], {"images": images})[0]


def onnx_providers(device: str = "cpu") -> list:
    """onnxruntime's execution providers for --device: cpu, cuda[:N], or auto (CUDA when offered)."""
    import onnxruntime as ort

    dev = str(device or "cpu").lower()
    available = ort.get_available_providers()
    if dev == "auto":
        dev = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if dev == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = dev.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {device}: an ONNX model is served on cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in available:
        raise UserError(f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
                        "install the onnxruntime-gpu package, or serve with --device cpu")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def inference_threads(requested: int = 0) -> int:
    return requested if requested > 0 else max(1, (os.cpu_count() or 1) - 1)


def load_backend(path: str | Path, device: str = "cpu", threads: int = 0, precision: str = "fp32"):
    p = Path(path)
    if p.is_dir():
        return TorchBackend(p, device, precision)
    if not p.exists():
        raise UserError(f"{p}: no such run folder or ONNX file")
    # the content decides, not the name: 'export --out model.v2' or a renamed download is still ONNX
    if p.is_file() and (p.suffix.lower() == ".onnx" or _looks_like_onnx(p)):
        if precision != "fp32":
            raise UserError(f"--precision {precision}: an exported ONNX model runs in fp32; drop --precision")
        return OnnxBackend(p, threads, device)
    raise UserError(f"{p}: serve a run folder (model.json + model.safetensors) or an .onnx file from 'imgclf export'")


def _looks_like_onnx(path: Path) -> bool:
    """An ONNX protobuf (as 'imgclf export' writes it: ir_version first, tag 0x08) that onnx parses."""
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x08":  # a pickle starts 0x80, a TorchScript zip 'PK': no parse needed
                return False
        import onnx

        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:
        return False


# --- metrics ----------------------------------------------------------------------------------

# Hand-written exposition: prometheus_client is not installed, and one counter plus two
# histograms are ~40 lines; every update happens on the event loop, so no locks are needed.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/", "/v1/predict", "/v1/model", "/healthz", "/health", "/metrics")
METRICS_DIR_ENV = "IMGCLF_METRICS_DIR"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {self.sum:.6f}", f"{name}_count{brace} {self.count}"]
        return out


_METRICS_SEQ = itertools.count()


class Metrics:
    """The server's counters. Under ``serve --workers N`` each worker process counts its own
    requests, and a scrape reaches one worker at random: its counters alone would jump between
    workers' values and read as resets. So each worker also writes its counts to ``shared_dir``
    (the supervisor's temporary folder, IMGCLF_METRICS_DIR), at most once a second, and /metrics
    adds up every worker's file: the figures are the server's, as with one process, and a
    restarted worker's old file keeps the totals from going down."""

    def __init__(self, shared_dir: str | Path | None = None, flush_s: float = 1.0, worker: str | None = None):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.shared = Path(shared_dir) if shared_dir else None
        self.flush_s, self._flush_due = flush_s, False
        # the process id, and a count for a second server in one process (tests, notebooks)
        self.worker = worker or f"{os.getpid()}-{next(_METRICS_SEQ)}"

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        path = path if path in ROUTES else "other"  # bounded label set whatever clients request
        key = (path, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)
        self.changed()

    def observe_batch(self, n: int) -> None:
        self.batch.observe(n)
        self.images += n
        self.changed()

    def changed(self) -> None:
        """Write this worker's file within flush_s (one write per second under load, not one per
        request); called on the event loop."""
        if self.shared is None or self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a direct call): write now
            self.flush()
            return
        self._flush_due = True
        loop.call_later(self.flush_s, self.flush)

    def state(self) -> dict:
        hist = lambda h: {"counts": h.counts, "sum": h.sum, "count": h.count}  # noqa: E731
        return {"requests": [[*k, n] for k, n in self.requests.items()],
                "latency": {p: hist(h) for p, h in self.latency.items()}, "batch": hist(self.batch),
                "images": self.images}

    def flush(self) -> None:
        self._flush_due = False
        if self.shared is None:
            return
        try:
            tmp = self.shared / f".{self.worker}.tmp"
            tmp.write_text(json.dumps(self.state()))
            os.replace(tmp, self.shared / f"{self.worker}.json")
        except OSError:  # the folder went (the supervisor is stopping): this worker's own counts still render
            pass

    def _merged(self) -> "Metrics":
        """Every worker's counts added up (this one's live, the others' from their files)."""
        if self.shared is None:
            return self
        self.flush()
        total = Metrics()
        for f in sorted(self.shared.glob("*.json")):
            try:
                st = json.loads(f.read_text())
            except (OSError, ValueError):  # a worker's file mid-replace or gone: counted next scrape
                continue
            for path, method, status, n in st["requests"]:
                key = (path, method, int(status))
                total.requests[key] = total.requests.get(key, 0) + n
            for path, h in st["latency"].items():
                _add(total.latency.setdefault(path, Histogram(LATENCY_BUCKETS)), h)
            _add(total.batch, st["batch"])
            total.images += st["images"]
        return total

    def render(self) -> str:
        m = self._merged()
        out = ["# HELP imgclf_requests_total HTTP requests by route, method and status.",
               "# TYPE imgclf_requests_total counter"]
        for (path, method, status), n in sorted(m.requests.items()):
            out.append(f'imgclf_requests_total{{path="{path}",method="{method}",status="{status}"}} {n}')
        out += ["# HELP imgclf_request_duration_seconds Time from request start to response end.",
                "# TYPE imgclf_request_duration_seconds histogram"]
        for path, h in sorted(m.latency.items()):
            out += h.lines("imgclf_request_duration_seconds", f'path="{path}"')
        out += ["# HELP imgclf_batch_size Images per forward pass.", "# TYPE imgclf_batch_size histogram"]
        out += m.batch.lines("imgclf_batch_size")
        out += ["# HELP imgclf_images_total Images classified.", "# TYPE imgclf_images_total counter",
                f"imgclf_images_total {m.images}"]
        return "\n".join(out) + "\n"


def _add(h: Histogram, st: dict) -> None:
    h.counts = [a + b for a, b in zip(h.counts, st["counts"])]
    h.sum += st["sum"]
    h.count += st["count"]


# --- ASGI middleware --------------------------------------------------------------------------


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs SHUTDOWN_GRACE_S after SIGTERM: a clean answer, not
            # its plain-text 500 and a traceback per request
            if status is None:
                status = 503
                await _send_json(send, 503, {"error": "server shutting down: the request was cancelled"})
        except Exception:
            status = status or 500
            raise
        finally:
            # no response at all: the client left first (nginx's 499), not a server error
            self.metrics.observe_request(scope["path"], scope["method"], status or 499, time.perf_counter() - t0)


class BodyLimitMiddleware:
    """Refuse a body over ``max_bytes`` while it streams in (or from Content-Length at once), so a
    huge upload costs at most ``max_bytes`` of memory and is never parsed; and one that stalls
    for ``idle_s`` (a Content-Length larger than what is sent, a slowloris trickle gone quiet),
    so it does not hold its connection and memory for ever (uvicorn has no body timeout)."""

    def __init__(self, app, max_bytes: int, idle_s: float = 30.0):
        self.app, self.max_bytes, self.idle_s = app, max_bytes, idle_s

    def _too_large(self) -> dict:
        return {"error": f"request body too large: the limit is {self.max_bytes / MB:g} MB (server option --max-body-mb)"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return await _send_json(send, 400, {"error": "invalid Content-Length header"})
            if declared_n > self.max_bytes:
                return await _send_json(send, 413, self._too_large())
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                return await _send_json(send, 408, {"error": f"request body incomplete: nothing received for "
                                                             f"{self.idle_s:g} s after {total} bytes"})
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await _send_json(send, 413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks  # held for the whole request otherwise: twice the body's memory per upload
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- batching ---------------------------------------------------------------------------------


def _summary(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}{': ' + text if text else ''}"


class Batcher:
    """An asyncio queue of single images and one collector feeding one inference thread. The
    queue itself is unbounded: the app caps the images in flight before anything is queued."""

    def __init__(self, backend, max_batch: int, max_wait_s: float, metrics: Metrics, probe: np.ndarray | None = None):
        self.backend, self.max_batch, self.max_wait_s, self.metrics = backend, max_batch, max_wait_s, metrics
        # why the last forward pass failed (None once one succeeds), and the one-image batch
        # health() runs then: a model that fails every pass must not be reported healthy
        self.failing: str | None = None
        self.probe = probe
        self._probing: asyncio.Future | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.full = asyncio.Event()
        # one thread: the model's own kernels use the cores; two forward passes would only fight
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="imgclf-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._collect())

    def problem(self) -> str | None:
        """None while the collector runs, else why no request can be answered."""
        if self.task is None:
            return "the batch collector has not started"
        if not self.task.done():
            return None
        if self.task.cancelled():
            return "the batch collector was stopped"
        exc = self.task.exception()
        if exc is None:
            return "the batch collector returned"
        return f"the batch collector died ({_summary(exc)})"

    async def health(self) -> str | None:
        """problem(), or why the model cannot classify: after a failed forward pass, a probe pass
        (shared by concurrent callers) says whether it still fails."""
        problem = self.problem()
        if problem or self.failing is None:
            return problem
        if self.probe is None:
            return f"the model's last forward pass failed ({self.failing})"
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe())
        return await asyncio.shield(self._probing)

    async def _probe(self) -> str | None:
        try:
            probs = await asyncio.get_running_loop().run_in_executor(self.pool, self.backend.probs, self.probe)
            if not np.isfinite(np.asarray(probs, np.float32)).all():
                raise RuntimeError("the model returned NaN or infinite probabilities")
        except Exception as e:
            self.failing = _summary(e)
            return f"the model fails ({self.failing})"
        self.failing = None
        return None

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except Exception:  # it had died already: problem() says so, /healthz reported it
                pass
        self.pool.shutdown(wait=True)

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        problem = self.problem()
        if problem:  # nothing would ever answer these futures
            raise BadRequest(503, f"server unavailable: {problem}")
        loop = asyncio.get_running_loop()
        futures = []
        for img in images:
            fut = loop.create_future()
            self.queue.put_nowait((img, fut))
            futures.append(fut)
        if self.queue.qsize() >= self.max_batch - 1:
            self.full.set()
        return list(await asyncio.gather(*futures))

    @staticmethod
    def _fail(batch: list, exc: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    async def _collect(self) -> None:
        batch: list = []
        try:
            while True:
                batch = [await self.queue.get()]
                try:
                    await self._run(batch)
                except Exception as e:  # a model (or stacking) failure fails these requests, not the server
                    self._fail(batch, e)
        finally:
            # cancelled (shutdown) or died on something worse: nobody else will answer these
            gone = RuntimeError("the batch collector stopped")
            self._fail(batch, gone)
            while not self.queue.empty():
                self._fail([self.queue.get_nowait()], gone)

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        if self.max_batch > 1 and self.max_wait_s > 0 and self.queue.qsize() < self.max_batch - 1:
            self.full.clear()
            try:
                await asyncio.wait_for(self.full.wait(), self.max_wait_s)
            except TimeoutError:
                pass
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        batch[:] = [(img, fut) for img, fut in batch if not fut.done()]  # clients that left
        if not batch:
            return
        images = np.stack([b[0] for b in batch])
        try:
            probs = np.asarray(await loop.run_in_executor(self.pool, self.backend.probs, images), np.float32)
            if len(probs) != len(batch):
                raise RuntimeError(f"the backend returned {len(probs)} rows for {len(batch)} images")
        except Exception as e:
            self.failing = _summary(e)
            raise
        self.metrics.observe_batch(len(batch))
        # NaN would be written as the bare token NaN, which no JSON parser accepts, and ranked at random
        broken = ~np.isfinite(probs).reshape(len(batch), -1).all(axis=1)
        self.failing = f"NaN or infinite probabilities for {broken.sum()} of {len(batch)} images" if broken.any() else None
        for (_, fut), p, bad in zip(batch, probs, broken):
            if fut.done():
                continue
            if bad:
                fut.set_exception(BadRequest(500, "the model returned NaN or infinite probabilities for this image"))
            else:
                fut.set_result(p)


async def _unless_client_leaves(request, work):
    """``await work``, or None as soon as the client disconnects: its images leave the decode
    pool and the batch queue, and its in-flight slots are free for clients still waiting.
    Called once the body is read, so the only message left to receive is the disconnect."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:  # no disconnect to watch for: just wait
            await asyncio.wait({task})
    except BaseException:  # this request itself cancelled (shutdown past its grace period)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: the client it was for is gone
    return None


# --- the app ----------------------------------------------------------------------------------


class BadRequest(Exception):
    """A 4xx/5xx answer: ``{"error": message}``, plus ``extra`` keys (the per-image ``errors`` of a
    request whose every image is bad)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra or {}


ERRORS_IN_MESSAGE = 5  # per-image errors spelt out in the "error" line of an all-bad request; all are in "errors"


def every_image_bad(names: list[str], errors: list[BadRequest]) -> BadRequest:
    """The answer to a request none of whose images could be read: every image's error, both in
    the one-line "error" and as ``errors``, entries shaped as the per-image errors of a request
    with good images too ({filename, error, status}). The status is theirs when they agree (413
    for images all too large), else 400."""
    entries = [{"filename": n, "error": e.message, "status": e.status} for n, e in zip(names, errors)]
    statuses = {e.status for e in errors}
    status = statuses.pop() if len(statuses) == 1 else 400
    if len(errors) == 1:
        return BadRequest(status, errors[0].message, extra={"errors": entries})
    shown = "; ".join(e.message for e in errors[:ERRORS_IN_MESSAGE])
    more = len(errors) - ERRORS_IN_MESSAGE
    if more > 0:
        shown += f"; and {more} more (each in 'errors')"
    return BadRequest(status, f"none of the {len(errors)} images could be read: {shown}", extra={"errors": entries})


def _thresholds(meta: dict, classes: list[str]) -> np.ndarray:
    # float64 so a threshold of 0.3 in model.json comes back as 0.3 in responses
    t = meta.get("thresholds")
    if t is None:
        return np.full(len(classes), 0.5)
    if isinstance(t, int | float):
        return np.full(len(classes), float(t))
    if isinstance(t, dict):
        return np.asarray([float(t.get(c, 0.5)) for c in classes])
    return np.asarray([float(v) for v in t])


def model_info(backend, cfg: ServeConfig) -> dict[str, Any]:
    meta = backend.meta
    keys = ("architecture", "classes", "task", "image_size", "resize", "mean", "std", "temperature", "thresholds")
    info = {k: meta.get(k) for k in keys}
    info["task"] = info["task"] or "single"
    info["temperature"] = float(info["temperature"] or 1.0)
    info.update({
        "name": getattr(backend, "name", None) or Path(backend.source).name, "backend": backend.kind,
        "source": backend.source, "precision": getattr(backend, "precision", None),
        "probabilities": ("sigmoid" if info["task"] == "multilabel" else "softmax") + "(logits / temperature)",
        "limits": {"max_body_mb": cfg.max_body_mb, "max_pixels": cfg.max_pixels, "max_images": cfg.max_images},
        "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
    })
    return info


def create_app(cfg: ServeConfig, backend=None):
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg.check()
    backend = backend or load_backend(cfg.model, cfg.device, cfg.threads, cfg.precision)
    info = model_info(backend, cfg)
    classes: list[str] = info["classes"]
    size, policy = int(info["image_size"]), info["resize"]
    multilabel = info["task"] == "multilabel"
    thresholds = _thresholds(backend.meta, classes)
    metrics = Metrics(os.environ.get(METRICS_DIR_ENV))  # set by the supervisor of --workers N
    probe = np.zeros((1, size, size, 3), np.uint8)
    batcher = Batcher(backend, cfg.max_batch, cfg.max_wait_ms / 1000.0, metrics, probe=probe)
    decode_pool = ThreadPoolExecutor(cfg.decode_threads or min(4, (os.cpu_count() or 1) + 1),
                                     thread_name_prefix="imgclf-decode")
    # warm the backend up (first call allocates, autotunes): no request should pay for it
    backend.probs(probe)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        # Everything loaded so far (torch, the model, FastAPI) lives as long as the server: out of
        # the cyclic GC's sight, a full collection no longer walks millions of objects and stalls
        # every request in flight (seen as a p99 spike every few seconds under load).
        gc.collect()
        gc.freeze()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False)

    app = FastAPI(title="imgclf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.batcher, app.state.info = metrics, batcher, info

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        detail = str(exc.detail)
        if exc.status_code == 400 and detail.startswith("Too many files"):
            # Starlette's multipart limit (max_files): said as a JSON or base64 body's excess is
            detail = f"too many images in one request: more than {cfg.max_images}"
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)

    # HEAD as well as GET: uptime checkers and load balancers often probe with HEAD
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    @app.api_route("/health", methods=["GET", "HEAD"])  # the other name probes and load balancers try
    async def healthz():
        problem = await batcher.health()
        if problem:
            return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model():
        return info

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def decode(item: tuple[str, bytes]) -> np.ndarray:
        return load_resized(item[1], size, policy, max_pixels=cfg.max_pixels)

    def decoded_pixels(data: bytes) -> int | None:
        """Pixels load_resized will decode (JPEG draft scale included), from the header alone;
        None when PIL cannot even open it (decode then reports why, cheaply)."""
        from PIL import Image

        try:
            # PIL's DecompressionBombWarning for a big (still allowed, or later refused with 413)
            # upload went to the server log as a raw Python warning
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as img:
                    img.draft(None, _draft_request(img.size, size, policy))  # JPEG only; a no-op elsewhere
                    w, h = img.size
        except Exception:
            return None
        return w * h

    in_flight = {"images": 0}  # images decoding, queued or being classified
    app.state.in_flight = in_flight
    in_flight_limit = cfg.in_flight_limit()

    async def read_images(request: Request) -> tuple[list[tuple[str, bytes]], int | None, str]:
        """The request's images (name, bytes), the top_k of a JSON body or a multipart form field
        (None: not given), and where that top_k came from."""
        ctype = request.headers.get("content-type", "")
        mtype = ctype.split(";")[0].strip().lower()
        if mtype == "multipart/form-data":
            items, top_k, unknown = [], None, []
            # +1 field: the 'top_k' text field beside up to max_images files
            async with request.form(max_files=cfg.max_images, max_fields=cfg.max_images + 1) as form:
                fields = sorted(set(form.keys()))
                for key, value in form.multi_items():
                    if key == "top_k":  # an HTML form's or curl -F's option
                        if not isinstance(value, str):
                            raise BadRequest(400, "multipart field 'top_k' holds a file upload, not a number")
                        if top_k is not None:
                            raise BadRequest(422, "invalid request: top_k is given more than once in the form")
                        top_k = _top_k_value(value.strip(), "form field top_k")
                        continue
                    if key not in ("file", "files"):
                        unknown.append(key)
                        continue
                    if isinstance(value, str):
                        raise BadRequest(400, f"multipart field '{key}' holds text, not a file upload")
                    items.append((value.filename or key, await value.read()))
            if not items:
                got = ", ".join(f"'{f}'" for f in fields) or "none"
                raise BadRequest(400, f"no image in the multipart body: send it in field 'file' (or repeated 'files'); "
                                      f"got field(s): {got}")
            if unknown:
                # an image in a field we do not read ('image', 'file1') was dropped from the answer
                # without a word, and a misspelt option ('topk') looked applied
                raise BadRequest(422, f"multipart body: unknown field '{unknown[0][:40]}'{_did_you_mean(unknown[0], FORM_FIELDS)}; "
                                      "the accepted fields are 'file' (or repeated 'files') and 'top_k'")
            return items, top_k, "form field"
        if mtype.startswith("image/") or mtype == "application/octet-stream":
            return [("body", await request.body())], None, ""
        if mtype == "application/json":
            return (*_json_images(await request.body(), cfg.max_images), "JSON body")
        what = f"unsupported Content-Type '{mtype}'" if mtype else "missing Content-Type"
        raise BadRequest(415, f"{what}: send multipart/form-data with field 'file' (or 'files'), "
                              "the raw image bytes as image/* or application/octet-stream, "
                              "or JSON {\"images\": [base64, ...]}")

    async def classify(items: list[tuple[str, bytes]], pixels: list[int | None]) -> list[np.ndarray | BadRequest]:
        """Probabilities per image; in a request of several images, an image that cannot be read
        is its own error (the others are still classified, as predict skips a bad file). A request
        whose every image is bad is refused whole, with every image's error (every_image_bad)."""
        if (None not in pixels and sum(pixels) <= INLINE_DECODE_PIXELS
                and sum(len(b) for _, b in items) <= INLINE_DECODE_BYTES):
            # a thumbnail decodes in tens of microseconds, less than the hop to a thread
            decoded = []
            for it in items:
                try:
                    decoded.append(decode(it))
                except BadImage as e:
                    decoded.append(e)
        else:
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(*(loop.run_in_executor(decode_pool, decode, it) for it in items),
                                           return_exceptions=True)
        out: list = []
        for i, (name, res) in enumerate(zip((n for n, _ in items), decoded)):
            if isinstance(res, BadImage):
                where = f"image {i} ('{name}')" if len(items) > 1 or name != "body" else "the request body"
                status = 413 if res.reason.startswith("image too large") else 400
                res = BadRequest(status, f"{where}: {res.reason}")
            elif isinstance(res, BaseException):
                raise res
            out.append(res)
        good = [i for i, res in enumerate(out) if not isinstance(res, BadRequest)]
        if not good:  # every image named: the first one's error alone hid why the others failed
            raise every_image_bad([n for n, _ in items], out)
        for i, p in zip(good, await batcher.submit([out[i] for i in good])):
            out[i] = p
        return out

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = Query(cfg.top_k, ge=1, le=MAX_TOP_K)):
        """Classify images: multipart/form-data with field 'file' (or repeated 'files'), the raw
        bytes of one image, or JSON {"images": [...]} (or {"image": ...}) of base64 strings or
        data: URLs, each optionally {"filename", "data"}, and optionally "top_k" (as the query
        string's). One prediction per image, in order: {filename, top: [{class, index,
        prob}]} (and labels for a multi-label model); an image of several that cannot be read is
        {filename, error, status} in its place. When none can be read: 400 (413 when all are too
        large) with "error" naming each, and "errors", one such entry per image."""
        t0 = time.perf_counter()
        _check_query(request.query_params)
        items, body_top_k, where = await read_images(request)
        if body_top_k is not None:
            query = request.query_params.get("top_k")
            if query is not None and top_k != body_top_k:  # neither silently wins
                raise BadRequest(422, f"invalid request: top_k is {query} in the query string and {body_top_k} in "
                                      f"the {where}: give it in one place")
            top_k = body_top_k
        if len(items) > cfg.max_images:
            raise BadRequest(400, f"too many images in one request: {len(items)} > {cfg.max_images}")
        pixels = [decoded_pixels(b) for _, b in items]
        # an image over --max-pixels on its own is refused by decode before any pixel is decoded
        # (with its own message), so it does not count; everything else would be decoded
        total = sum(p for p in pixels if p is not None and p <= cfg.max_pixels)
        if total > cfg.max_pixels:
            raise BadRequest(413, f"images too large together: the {len(items)} images in this request total {total} "
                                  f"pixels, over the per-request limit of {cfg.max_pixels} (server option "
                                  "--max-pixels); send them in several requests")
        if in_flight["images"] + len(items) > in_flight_limit:
            raise BadRequest(503, f"server busy: {in_flight['images']} images in flight (limit {in_flight_limit}, "
                                  f"server option --max-in-flight); retry in {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        in_flight["images"] += len(items)
        try:
            probs = await _unless_client_leaves(request, classify(items, pixels))
        finally:
            in_flight["images"] -= len(items)
        if probs is None:  # nobody to answer: the status is for /metrics (nginx's 499)
            return Response(status_code=499)
        k = min(top_k, len(classes))
        preds = []
        for (name, _), p in zip(items, probs):
            if isinstance(p, BadRequest):  # one bad image of several: said in its place
                preds.append({"filename": name, "error": p.message, "status": p.status})
                continue
            order = np.argsort(-p)[:k]
            pred: dict[str, Any] = {"filename": name,
                                    "top": [{"class": classes[j], "index": int(j), "prob": float(p[j])} for j in order]}
            if multilabel:
                hits = np.flatnonzero(p >= thresholds)
                hits = hits[np.argsort(-p[hits])]
                pred["labels"] = [{"class": classes[j], "index": int(j), "prob": float(p[j]),
                                   "threshold": float(thresholds[j])} for j in hits]
            preds.append(pred)
        # serialised here: FastAPI's generic encoder of a returned dict costs more than the model
        # on small images
        return Response(json.dumps({"model": info["name"], "task": info["task"], "predictions": preds,
                                    "time_ms": round((time.perf_counter() - t0) * 1000, 2)}),
                        media_type="application/json")

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug: still JSON, and the traceback goes to the log
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    # outermost first: metrics see every response, including the body limit's 413s
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(cfg.max_body_mb * MB), idle_s=cfg.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# --- running ----------------------------------------------------------------------------------

_ENV = "IMGCLF_SERVE_CONFIG"


def _set_torch_threads(cfg: ServeConfig) -> None:
    if cfg.device == "cpu":
        import torch

        torch.set_num_threads(cfg.threads)


def app_from_env():
    """uvicorn factory for --workers > 1 (each worker process loads its own model). Each worker is
    a process of its own: torch's thread count set in the parent does not reach it."""
    cfg = ServeConfig(**json.loads(os.environ[_ENV]))
    cfg.threads = inference_threads(cfg.threads)
    _set_torch_threads(cfg)
    from imgclf.procs import end_with_parent

    # a worker whose supervisor was killed (kill -9, the OOM killer) would go on serving the port
    # alone, and the next 'imgclf serve' there would find it taken; SIGTERM is uvicorn's graceful stop
    end_with_parent(os.getppid(), poll_s=0.5)
    return create_app(cfg)


def uvicorn_options(log_level: str = "warning", max_connections: int = 0) -> dict[str, Any]:
    """uvicorn.Config's options for every server this module starts (CLI, workers, ServerThread)."""
    import inspect

    import uvicorn

    opts: dict[str, Any] = {"log_level": log_level, "access_log": False,
                            "timeout_graceful_shutdown": SHUTDOWN_GRACE_S}
    if max_connections:  # past it uvicorn answers 503 before reading a byte of the body
        # +1: uvicorn counts the connection asking among those open (limit 1 would refuse every one)
        opts["limit_concurrency"] = max_connections + 1
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:  # uvicorn >= 0.36
        opts["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_S
    return opts


def listen_socket(host: str, port: int):
    """A socket bound to host:port, so a taken port is a one-line error before the model loads and
    the "serving at" line is printed only for an address the server really holds. Bound the way
    uvicorn binds its own (SO_REUSEADDR, IPv6 for a host with ':')."""
    import errno
    import socket

    if not 0 <= port <= 65535:  # the OS would take 99999 as 99999 % 65536 or refuse with a traceback
        raise UserError(f"--port must be 0-65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the port is in use: pick another --port" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise UserError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "warning") -> None:
    cfg.check()
    if str(log_level).lower() not in LOG_LEVELS:
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_level = str(log_level).lower()
    import torch

    threads = torch.get_num_threads()
    sock = listen_socket(host, port)
    try:
        _serve_on(sock, cfg, host, workers, log_level)
    finally:
        sock.close()
        # the server owned the process's cores; a caller that goes on (a notebook, a test, a
        # model that failed to load) gets its own thread count back
        torch.set_num_threads(threads)


def _serve_on(sock, cfg: ServeConfig, host: str, workers: int, log_level: str) -> None:
    import uvicorn

    port = sock.getsockname()[1]  # the real one when --port 0 asked the OS to pick
    # A server process owns its cores: torch's thread count is process-wide, so it is set here and
    # not in create_app (which tests and notebooks call in-process). On a busy machine, OpenMP
    # threads beyond the free cores spin and cost more CPU than they return.
    cfg.threads = inference_threads(cfg.threads)
    _set_torch_threads(cfg)
    if workers > 1:
        load_backend(cfg.model, cfg.device, precision=cfg.precision)  # fail here, once, with a clear line, not in every worker
        os.environ[_ENV] = json.dumps(asdict(cfg))
        # the workers add up their /metrics counts through files here (Metrics); removed at exit
        shared = tempfile.mkdtemp(prefix="imgclf-metrics-")
        atexit.register(shutil.rmtree, shared, ignore_errors=True)
        os.environ[METRICS_DIR_ENV] = shared
        # uvicorn's supervisor binds the port itself (its API for a given socket changes between
        # versions): ours only proved the port free, and is let go the moment before
        sock.close()
        print(f"imgclf serving {cfg.model} at http://{host}:{port}/ with {workers} worker processes")
        uvicorn.run("imgclf.deploy.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    **uvicorn_options(log_level, cfg.max_connections))
        return
    app = create_app(cfg)
    info = app.state.info
    sock.listen(2048)  # from here connections queue until the server accepts them: it is serving
    print(f"imgclf serving {cfg.model} ({info['backend']}, {len(info['classes'])} classes, {info['image_size']}px "
          f"{info['resize']}) at http://{host}:{port}/  batching up to {cfg.max_batch} within {cfg.max_wait_ms:g} ms",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **uvicorn_options(log_level, cfg.max_connections)))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C during start-up or shutdown is a normal exit
        pass


JSON_KEYS = ("images", "image", "top_k")  # what a JSON body may hold; any other key is refused
FORM_FIELDS = ("file", "files", "top_k")  # what a multipart body may hold
QUERY_KEYS = ("top_k",)  # what /v1/predict's query string may hold


def _did_you_mean(name: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(name).lower(), choices, 1, 0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _top_k_value(value, where: str) -> int:
    """A top_k from a JSON body (a number) or a form field (its text), checked as the query's."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            value = value[:40]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise BadRequest(422, f"invalid request: {where} must be an integer from 1 to {MAX_TOP_K}, "
                              f"got {json.dumps(value)[:40]}")
    return value


def _check_query(params) -> None:
    """Refuse a query string /v1/predict does not read: '?topk=1' or '?top-k=1' was ignored without
    a word, and the answer (5 classes) looked as though it had been applied; a repeated top_k
    silently took its last value."""
    keys = [k for k, _ in params.multi_items()]
    unknown = [k for k in keys if k not in QUERY_KEYS]
    if unknown:
        raise BadRequest(422, f"invalid request: unknown query parameter '{unknown[0][:40]}'"
                              f"{_did_you_mean(unknown[0].replace('-', '_'), QUERY_KEYS)}; /v1/predict takes 'top_k'")
    if keys.count("top_k") > 1:
        raise BadRequest(422, "invalid request: top_k is given more than once in the query string")


def _json_images(body: bytes, limit: int) -> tuple[list[tuple[str, bytes]], int | None]:
    """The images of a JSON request: {"images": [item, ...]} or {"image": item}, an item being the
    base64 of the file (a browser's data:image/...;base64, URL too) or {"filename", "data"}, and
    its "top_k" (None when not given). For
    clients that cannot send multipart (serverless functions, a canvas in a web page). A string
    that is not base64 refuses the request (a client's bug); bytes that are not an image are that
    image's error, as in a multipart request."""
    import base64
    import binascii

    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the JSON body does not parse: {e}") from None
    except RecursionError:  # [[[[...]]]] nested past Python's recursion limit: a 500 and a traceback
        raise BadRequest(400, "the JSON body does not parse: nested too deeply") from None
    top_k = None
    if isinstance(doc, dict):
        # a key we do not read (a misspelt "topk", an option of another server) would otherwise be
        # ignored without a word, and the answer would look like it had been applied
        unknown = [k for k in doc if k not in JSON_KEYS]
        if unknown:
            raise BadRequest(422, f"JSON body: unknown key '{unknown[0]}'{_did_you_mean(unknown[0], JSON_KEYS)}; the "
                                  "accepted keys are 'images' (a list of base64 strings), 'image' (one) and 'top_k'")
        if "images" in doc and "image" in doc:
            raise BadRequest(422, "JSON body: give 'images' (a list) or 'image' (one), not both")
        if "top_k" in doc:
            if isinstance(doc["top_k"], str):  # the JSON body takes a number, not its text
                raise BadRequest(422, f"invalid request: body.top_k must be an integer from 1 to {MAX_TOP_K}, "
                                      f"got {json.dumps(doc['top_k'])[:40]}")
            top_k = _top_k_value(doc["top_k"], "body.top_k")
    got = doc.get("images", [doc["image"]] if "image" in doc else None) if isinstance(doc, dict) else None
    if got is None:
        keys = ", ".join(f"'{k}'" for k in doc) if isinstance(doc, dict) else type(doc).__name__
        raise BadRequest(400, "JSON body: send {\"images\": [base64, ...]} (or {\"image\": base64}); "
                              f"got {keys or 'an empty object'}")
    if not isinstance(got, list) or not got:
        raise BadRequest(400, "JSON body: 'images' must be a list of one or more base64 strings, got "
                              + ("an empty list" if isinstance(got, list) else type(got).__name__))
    if len(got) > limit:  # before decoding any of them
        raise BadRequest(400, f"too many images in one request: {len(got)} > {limit}")
    items = []
    for i, item in enumerate(got):
        name, data = f"image{i}", item
        if isinstance(item, dict):
            name, data = str(item.get("filename") or name), item.get("data")
            if data is None:
                raise BadRequest(400, f"JSON body: image {i} ('{name}') has no 'data' (its base64)")
        if not isinstance(data, str):
            raise BadRequest(400, f"JSON body: image {i} is {type(data).__name__}, not a base64 string")
        if data.startswith("data:"):  # data:image/png;base64,....
            head, _, data = data.partition(",")
            if not head.endswith(";base64"):
                raise BadRequest(400, f"JSON body: image {i} is a data: URL that is not base64")
        text = "".join(data.split())
        if "-" in text or "_" in text:  # the URL-safe alphabet (base64url: JWT, browsers' atob-free code)
            text = text.translate(str.maketrans("-_", "+/"))
        try:
            items.append((name, base64.b64decode(text + "=" * (-len(text) % 4), validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"JSON body: image {i} ('{name}') is not valid base64") from None
    return items, top_k


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]



class ServerThread:
    """uvicorn in a background thread on loopback (tests, notebooks): ``with ServerThread(app) as url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, max_connections: int = 0):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port,
                                                    **uvicorn_options(max_connections=max_connections)))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True, name="imgclf-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

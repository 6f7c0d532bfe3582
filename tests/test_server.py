"""The HTTP server on a real uvicorn (loopback, free port): bad input, metrics, batching, backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import struct
import time
import zlib

import fastapi  # noqa: F401  (the test install, .[dev], always has the [deploy] extra and httpx)
import httpx
import numpy as np
import pytest

from imgclf.deploy.server import ServeConfig, ServerThread, create_app  # noqa: E402


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height: ~50 KB on the wire, 1.2 GB once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def jpeg(sample_dir) -> bytes:
    return sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def server(tiny_run):
    # 30 ms of batching wait makes "arrived together" deterministic on a loaded test machine
    app = create_app(ServeConfig(model=str(tiny_run), max_wait_ms=30, max_batch=32))
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    return float(m.group(1)) if m else 0.0


def test_bad_inputs_are_4xx_with_json_errors_then_good_request_succeeds(client, jpeg):
    cases = [
        ("non-image bytes", dict(files={"file": ("notes.txt", b"hello, I am not an image", "image/jpeg")}),
         400, "not an image file"),
        ("truncated JPEG", dict(content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"}),
         400, "truncated or corrupt"),
        ("zero bytes raw", dict(content=b"", headers={"content-type": "application/octet-stream"}), 400, "empty file"),
        ("zero bytes upload", dict(files={"file": ("e.jpg", b"", "image/jpeg")}), 400, "empty file"),
        ("20000x20000 bomb", dict(content=bomb_png(), headers={"content-type": "image/png"}),
         413, "image too large: 400000000 pixels exceeds limit of 40000000"),
        ("body over 10 MB", dict(content=b"\xff\xd8\xff" + bytes(11 << 20), headers={"content-type": "image/jpeg"}),
         413, "request body too large: the limit is 10 MB"),
        ("wrong field name", dict(files={"image": ("cat.jpg", jpeg, "image/jpeg")}),
         400, "send it in field 'file' (or repeated 'files'); got field(s): 'image'"),
        ("text in the file field", dict(data={"file": "cat.jpg"}, files={"other": ("x", b"x")}),
         400, "holds text, not a file upload"),
        ("wrong content type", dict(content=jpeg, headers={"content-type": "text/plain"}),
         415, "unsupported Content-Type 'text/plain'"),
        ("no content type", dict(content=jpeg), 415, "missing Content-Type"),
        ("bad top_k", dict(content=jpeg, headers={"content-type": "image/jpeg"}, params={"top_k": "zero"}),
         422, "top_k"),
    ]
    for what, kwargs, status, text in cases:
        r = client.post("/v1/predict", **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert text in r.json()["error"], (what, r.json())
    r = client.get("/no/such/page")
    assert r.status_code == 404 and "error" in r.json()

    r = client.post("/v1/predict", files={"file": ("cat.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["filename"] == "cat.jpg" and len(pred["top"]) == 5
    assert client.get("/healthz").json() == {"status": "ok"}
    # probes that send HEAD (uptime checkers, some load balancers) get 200, not 405
    assert client.head("/healthz").status_code == 200 and client.head("/").status_code == 200


def test_a_big_upload_is_refused_without_a_raw_python_warning_in_the_log(client, recwarn):
    # 144 megapixels: over PIL's warning size (89M), under its error size; the server refuses it
    # (its --max-pixels) and said so, but PIL's DecompressionBombWarning also reached the log
    r = client.post("/v1/predict", content=bomb_png(12_000, 12_000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "12000x12000 pixels exceeds" in r.json()["error"]
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_streamed_body_over_limit_is_refused_while_reading(client):
    sent = 0

    def body():  # chunked transfer, no Content-Length: the limit must be counted as it arrives
        nonlocal sent
        for _ in range(40):
            sent += 1 << 20
            yield bytes(1 << 20)

    try:
        r = client.post("/v1/predict", content=body(), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413 and "too large" in r.json()["error"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server closed the connection on us mid-upload: refused early, which is the point
    assert sent < 40 << 20  # not all 40 MB were taken
    assert client.get("/healthz").status_code == 200


def test_predictions_multipart_many_and_raw_match_the_classifier(client, jpeg, sample_dir, tiny_run):
    import imgclf

    files = sorted((sample_dir / "test" / "ship").glob("*.jpg"))[:3]
    r = client.post("/v1/predict", params={"top_k": 3},
                    files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f.name for f in files]
    expected = imgclf.load(tiny_run, "cpu").predict([str(f) for f in files], top_k=3)
    for p, e in zip(preds, expected):
        assert [t["class"] for t in p["top"]][:1] == [e["top"][0][0]]
        assert p["top"][0]["prob"] == pytest.approx(e["top"][0][1], abs=0.02)
        assert all(a["prob"] >= b["prob"] for a, b in zip(p["top"], p["top"][1:]))
    raw = client.post("/v1/predict", content=files[0].read_bytes(), headers={"content-type": "image/jpeg"}).json()
    assert raw["predictions"][0]["top"][0]["class"] == preds[0]["top"][0]["class"]
    full = client.post("/v1/predict", params={"top_k": 100}, content=jpeg, headers={"content-type": "image/jpeg"}).json()
    assert sum(t["prob"] for t in full["predictions"][0]["top"]) == pytest.approx(1.0, abs=1e-4)


def test_json_bodies_carry_base64_images_and_data_urls(client, jpeg, sample_dir):
    """For clients that cannot send multipart: {"images": [...]} of base64 strings, data: URLs
    (a browser canvas's toDataURL) or {"filename", "data"}; the same predictions as an upload."""
    import base64

    files = sorted((sample_dir / "test" / "ship").glob("*.jpg"))[:2]
    b64 = [base64.b64encode(f.read_bytes()).decode() for f in files]
    want = client.post("/v1/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]).json()
    body = {"images": [b64[0], {"filename": files[1].name, "data": "data:image/jpeg;base64," + b64[1]}]}
    got = client.post("/v1/predict", json=body).json()["predictions"]
    assert [p["filename"] for p in got] == ["image0", files[1].name]
    assert [p["top"] for p in got] == [p["top"] for p in want["predictions"]]
    one = client.post("/v1/predict", json={"image": base64.b64encode(jpeg).decode()}).json()["predictions"]
    assert len(one) == 1 and len(one[0]["top"]) == 5
    # wrapped base64 (76 columns, as many encoders write it) is still base64
    wrapped = base64.encodebytes(jpeg).decode()
    assert client.post("/v1/predict", json={"image": wrapped}).json()["predictions"][0]["top"] == one[0]["top"]
    # and so is base64url without its padding (JWT-style encoders)
    url = base64.urlsafe_b64encode(jpeg).decode().rstrip("=")
    assert "-" in url or "_" in url
    assert client.post("/v1/predict", json={"image": url}).json()["predictions"][0]["top"] == one[0]["top"]
    bad = [({}, "send {\"images\": [base64, ...]}"), ([b64[0]], "got list"),
           ({"images": []}, "'images' must be a list of one or more base64 strings, got an empty list"),
           ({"images": "abc"}, "got str"), ({"images": [{"filename": "x.jpg"}]}, "image 0 ('x.jpg') has no 'data'"),
           ({"images": [3]}, "image 0 is int, not a base64 string"),
           ({"images": ["%%%not base64%%%"]}, "image 0 ('image0') is not valid base64"),
           ({"image": "data:image/png,rawtext"}, "a data: URL that is not base64"),
           ({"images": [b64[0]] * 500}, "too many images in one request: 500")]
    for doc, text in bad:
        r = client.post("/v1/predict", json=doc)
        assert r.status_code == 400 and text in r.json()["error"], (doc if len(str(doc)) < 80 else text, r.text)
    # the same limit on a multipart upload, in the same words (it was Starlette's "Too many files")
    r = client.post("/v1/predict", files=[("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(300)])
    assert r.status_code == 400 and r.json()["error"] == "too many images in one request: more than 256", r.text
    r = client.post("/v1/predict", json={"img": b64[0]})  # a key we do not read is refused, not ignored
    assert r.status_code == 422 and "unknown key 'img' (did you mean 'image'?)" in r.json()["error"]
    r = client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "does not parse" in r.json()["error"]
    # an image that is not one is its own error among good ones, as in a multipart request
    mixed = client.post("/v1/predict", json={"images": [b64[0], base64.b64encode(b"hello").decode()]}).json()
    assert "top" in mixed["predictions"][0] and "not an image file" in mixed["predictions"][1]["error"]


def test_a_bad_image_among_several_is_its_own_error_and_the_rest_are_classified(client, jpeg):
    # one truncated upload in a batch of three used to refuse the whole request with 400
    files = [("files", ("a.jpg", jpeg, "image/jpeg")), ("files", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")),
             ("files", ("b.jpg", jpeg, "image/jpeg"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    a, cut, b = r.json()["predictions"]
    assert cut == {"filename": "cut.jpg", "status": 400,
                   "error": cut["error"]} and cut["error"].startswith("image 1 ('cut.jpg'): truncated or corrupt")
    assert "top" not in cut and a["top"] == b["top"] and len(a["top"]) == 5
    # every image bad: nothing to answer, so the request fails with every image's reason
    r = client.post("/v1/predict", files=[files[1], ("files", ("t.jpg", b"text", "image/jpeg"))])
    assert r.status_code == 400 and r.json()["error"].startswith("none of the 2 images could be read: "
                                                                 "image 0 ('cut.jpg'): truncated or corrupt")
    assert [e["filename"] for e in r.json()["errors"]] == ["cut.jpg", "t.jpg"]


def test_model_description_and_page(client, tiny_run):
    info = client.get("/v1/model").json()
    assert info["backend"] == "pytorch" and info["classes"][0] == "airplane" and info["image_size"] == 32
    meta = json.loads((tiny_run / "model.json").read_text())
    # the calibrated temperature that train fitted on val is what the server applies
    assert info["resize"] == "stretch" and info["temperature"] == pytest.approx(meta["temperature"])
    assert meta["temperature"] != 1.0 and info["task"] == "single"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file"' in page.text
    assert "max_body_mb" in page.text  # an oversized file is refused on the page with the server's message
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no CDN, no external fonts


def test_metrics_count_requests_by_status(client, jpeg):
    before = client.get("/metrics").text
    assert client.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200
    assert client.post("/v1/predict", content=b"nope", headers={"content-type": "image/jpeg"}).status_code == 400
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for status in (200, 400):
        labels = dict(path="/v1/predict", method="POST", status=status)
        assert metric(text, "imgclf_requests_total", **labels) == metric(before, "imgclf_requests_total", **labels) + 1
    count = 'imgclf_request_duration_seconds_count{path="/v1/predict"}'
    assert metric(text, count) == metric(before, count) + 2
    assert metric(text, 'imgclf_request_duration_seconds_bucket{path="/v1/predict",le="+Inf"}') == metric(text, count)
    assert "# TYPE imgclf_batch_size histogram" in text


def test_concurrent_requests_are_batched(server, sample_dir):
    url, _ = server
    images = [p.read_bytes() for p in sorted((sample_dir / "test").glob("*/*.jpg"))[::50][:24]]

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            before = (await c.get("/metrics")).text
            rs = await asyncio.gather(*(c.post("/v1/predict", content=b, headers={"content-type": "image/jpeg"})
                                        for b in images))
            return before, rs, (await c.get("/metrics")).text

    before, responses, after = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(images)
    passes = metric(after, "imgclf_batch_size_count") - metric(before, "imgclf_batch_size_count")
    served = metric(after, "imgclf_batch_size_sum") - metric(before, "imgclf_batch_size_sum")
    assert served == len(images)
    assert passes < len(images) / 2, f"{len(images)} concurrent images took {passes} forward passes"
    singles = metric(after, "imgclf_batch_size_bucket", le="1") - metric(before, "imgclf_batch_size_bucket", le="1")
    assert singles < passes or passes == 1


def test_onnx_backend_serves_the_exported_model(tiny_run, tmp_path, sample_dir):
    from fastapi.testclient import TestClient

    from imgclf.deploy.export import export

    onnx_file = tmp_path / "tiny.onnx"
    export(tiny_run, "onnx", onnx_file, parity_images=8, verbose=False)
    files = sorted((sample_dir / "test" / "frog").glob("*.jpg"))[:4]
    payload = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    with TestClient(create_app(ServeConfig(model=str(onnx_file)))) as oc, \
            TestClient(create_app(ServeConfig(model=str(tiny_run)))) as tc:
        assert oc.get("/v1/model").json()["backend"] == "onnx"
        a = oc.post("/v1/predict", files=payload).json()["predictions"]
        b = tc.post("/v1/predict", files=payload).json()["predictions"]
    for x, y in zip(a, b):
        assert x["top"][0]["class"] == y["top"][0]["class"]
        # both fp32 (serve's default --precision): only kernel-order rounding apart
        assert x["top"][0]["prob"] == pytest.approx(y["top"][0]["prob"], abs=1e-3)


class _FixedMultilabel:
    """A stand-in backend for a multi-label model: fixed sigmoid outputs, per-class thresholds."""

    kind, source = "stub", "multilabel-stub"
    meta = {"architecture": "stub", "classes": ["cat", "dog", "car", "tree"], "task": "multilabel", "image_size": 16,
            "resize": "letterbox", "mean": [0.5] * 3, "std": [0.5] * 3, "temperature": 1.0,
            "thresholds": [0.5, 0.3, 0.9, 0.5]}

    def probs(self, images):
        return np.tile(np.asarray([0.8, 0.35, 0.6, 0.1], np.float32), (len(images), 1))


def test_multilabel_models_return_every_label_over_its_threshold(jpeg):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ServeConfig(model="stub"), backend=_FixedMultilabel())) as c:
        assert c.get("/v1/model").json()["probabilities"].startswith("sigmoid")
        (p,) = c.post("/v1/predict", params={"top_k": 2}, content=jpeg, headers={"content-type": "image/jpeg"}).json()["predictions"]
    assert [t["class"] for t in p["top"]] == ["cat", "car"]
    assert [(lab["class"], lab["threshold"]) for lab in p["labels"]] == [("cat", 0.5), ("dog", 0.3)]


def test_cli_refuses_what_it_cannot_serve(tmp_path, capsys):
    from imgclf.cli import main

    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    assert main(["serve", str(pickled)]) == 2
    assert "serve a run folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no such run folder or ONNX file" in capsys.readouterr().err


def _png(width: int, height: int) -> bytes:
    """A small-bytes 1-bit PNG: its compressed size says nothing about its pixel count."""
    return bomb_png(width, height)


def test_decoding_is_inline_or_pooled_by_header_pixels_and_a_request_has_a_pixel_budget(monkeypatch):
    import threading

    from fastapi.testclient import TestClient

    from imgclf.deploy import server as srv

    threads = []
    real = srv.load_resized

    def spy(*a, **kw):
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(srv, "load_resized", spy)
    big, small = _png(1000, 1000), _png(8, 8)
    assert len(big) < srv.INLINE_DECODE_BYTES  # the old rule (compressed size) decoded it on the event loop
    with TestClient(create_app(ServeConfig(model="stub", max_pixels=2_500_000), backend=_FixedMultilabel())) as c:
        for body, pooled in ((small, False), (big, True)):
            threads.clear()
            r = c.post("/v1/predict", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert [t.startswith("imgclf-decode") for t in threads] == [pooled], threads
        # each image under --max-pixels, together over it: refused from the headers, nothing decoded
        threads.clear()
        r = c.post("/v1/predict", files=[("files", (f"{i}.png", big, "image/png")) for i in range(3)])
        assert r.status_code == 413 and "3000000 pixels, over the per-request limit of 2500000" in r.json()["error"]
        assert threads == []


class _Blocking(_FixedMultilabel):
    """Blocks inside the forward pass (after the warm-up call) until released."""

    def __init__(self):
        import threading

        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def probs(self, images):
        if self.armed:
            self.entered.set()
            assert self.release.wait(30)
        return super().probs(images)


@contextlib.contextmanager
def _one_request_held(c: httpx.Client, backend: _Blocking, jpeg: bytes):
    """One image posted through ``c`` and held inside the model's forward pass for the body of
    the with-block; released after it, and its response checked to be a 200."""
    import threading

    backend.armed = True
    first = {}
    t = threading.Thread(target=lambda: first.update(r=c.post("/v1/predict", content=jpeg,
                                                                headers={"content-type": "image/jpeg"})))
    t.start()
    try:
        assert backend.entered.wait(30)
        yield
    finally:
        backend.release.set()
        t.join(30)
    assert first["r"].status_code == 200


def test_images_in_flight_are_capped_with_503_and_retry_after(jpeg):
    backend = _Blocking()
    app = create_app(ServeConfig(model="stub", max_images=2, max_in_flight=2, max_wait_ms=0), backend=backend)
    two = [("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(2)]
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with _one_request_held(c, backend, jpeg):
            # one image in flight: a second fits, two more do not
            r = c.post("/v1/predict", files=two)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "server busy: 1 images in flight (limit 2" in r.json()["error"]
        assert c.post("/v1/predict", files=two).status_code == 200  # the slots came back
        assert app.state.in_flight["images"] == 0


def test_collector_survives_a_stacking_error_and_healthz_reports_a_dead_one(jpeg):
    from concurrent.futures import Future

    from fastapi.testclient import TestClient

    from imgclf.deploy.server import Batcher, Metrics

    async def go():
        b = Batcher(_FixedMultilabel(), max_batch=8, max_wait_s=0.01, metrics=Metrics())
        b.start()
        try:  # two shapes in one batch: np.stack raises outside the model call
            with pytest.raises(ValueError):
                await asyncio.wait_for(b.submit([np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]), 10)
            assert b.problem() is None
            (p,) = await asyncio.wait_for(b.submit([np.zeros((16, 16, 3), np.uint8)]), 10)
            assert p.shape == (4,)
        finally:
            await b.stop()

    asyncio.run(go())

    with TestClient(create_app(ServeConfig(model="stub"), backend=_FixedMultilabel())) as c:
        batcher = c.app.state.batcher
        assert c.get("/healthz").status_code == 200
        alive, dead = batcher.task, Future()
        dead.set_exception(RuntimeError("boom"))
        batcher.task = dead
        try:
            r = c.get("/healthz")
            assert r.status_code == 503 and "batch collector died (RuntimeError: boom)" in r.json()["error"]
            r = c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"})
            assert r.status_code == 503 and "batch collector died" in r.json()["error"]
        finally:
            batcher.task = alive


def test_options_are_checked_with_one_line_errors(client, jpeg):
    from imgclf.errors import UserError

    for bad, text in [(dict(decode_threads=-1), "--decode-threads must be >= 0"), (dict(top_k=0), "--top-k must be >= 1"),
                      (dict(top_k=-3), "--top-k must be >= 1"), (dict(max_images=0), "max_images"),
                      (dict(max_in_flight=-1), "--max-in-flight"), (dict(max_images=8, max_in_flight=4), "--max-in-flight")]:
        with pytest.raises(UserError, match=text):
            create_app(ServeConfig(model="stub", **bad), backend=_FixedMultilabel())
    for k in ("0", "-1"):
        r = client.post("/v1/predict", params={"top_k": k}, content=jpeg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 422 and "top_k" in r.json()["error"]


def test_worker_factory_sets_torch_threads(tiny_run, monkeypatch):
    import torch

    from imgclf import procs
    from imgclf.deploy import server as srv

    calls, watched = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    # a worker stops with its parent (uvicorn's supervisor)
    monkeypatch.setattr(procs, "end_with_parent", lambda parent, **kw: watched.append(parent))
    monkeypatch.setenv(srv._ENV, json.dumps({"model": str(tiny_run), "threads": 1}))
    srv.app_from_env()
    assert calls == [1] and watched == [os.getppid()]


def test_client_gone_before_a_response_is_499_not_500(server):
    import socket
    import time

    url, _ = server
    host, port = url.split("//")[1].split(":")
    before = httpx.get(url + "/metrics").text
    labels = dict(path="/v1/predict", method="POST")
    with socket.create_connection((host, int(port))) as s:  # half a body, then gone
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
                  + b"\xff" * 10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = httpx.get(url + "/metrics").text
        if metric(after, "imgclf_requests_total", **labels, status=499) > metric(before, "imgclf_requests_total", **labels, status=499):
            break
        time.sleep(0.05)
    assert metric(after, "imgclf_requests_total", **labels, status=499) == metric(before, "imgclf_requests_total", **labels, status=499) + 1
    assert metric(after, "imgclf_requests_total", **labels, status=500) == metric(before, "imgclf_requests_total", **labels, status=500)


def test_serve_refuses_a_port_out_of_range_or_in_use_in_one_line(tiny_run, capsys):
    import socket

    from imgclf.cli import main

    for port in ("99999", "65536", "-1"):  # 99999 used to listen on 99999 % 65536 while printing 99999
        assert main(["serve", str(tiny_run), "--port", port]) == 2
        cap = capsys.readouterr()
        assert "--port must be 0-65535" in cap.err and len(cap.err.strip().splitlines()) == 1
        assert "serving" not in cap.out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_run), "--port", str(port)]) == 2
    cap = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in cap.err
    assert len(cap.err.strip().splitlines()) == 1 and "serving" not in cap.out  # no start announced


def test_serving_line_is_printed_once_the_port_is_listening(tiny_run, monkeypatch, capsys):
    import socket

    import torch
    import uvicorn

    from imgclf.deploy.server import serve

    seen = {}

    def fake_run(self, sockets=None):  # stands in for the server loop: what holds at that moment
        seen["out"] = capsys.readouterr().out
        seen["port"] = sockets[0].getsockname()[1] if sockets else None
        if seen["port"]:
            with socket.create_connection(("127.0.0.1", seen["port"]), timeout=5):
                seen["connected"] = True  # queued by the listening socket, as uvicorn will accept it

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve() owns the process; a test does not
    serve(ServeConfig(model=str(tiny_run), threads=1), port=0)  # port 0: the OS picks; the line says which
    assert seen["port"] and seen.get("connected")
    assert f"at http://127.0.0.1:{seen['port']}/" in seen["out"]


def test_onnx_on_cuda_uses_the_cuda_provider_or_refuses_in_one_line(tiny_run, tmp_path, monkeypatch):
    import onnxruntime as ort

    from imgclf.deploy.export import export
    from imgclf.deploy.server import load_backend
    from imgclf.errors import UserError

    onnx_file = tmp_path / "tiny.onnx"
    export(tiny_run, "onnx", onnx_file, parity_images=4, verbose=False)
    # an onnxruntime without CUDA (the plain `onnxruntime` package) used to serve on the CPU, silently
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="this onnxruntime has no CUDA provider.*onnxruntime-gpu") as e:
        load_backend(onnx_file, "cuda")
    assert "\n" not in str(e.value)
    assert load_backend(onnx_file, "cpu").sess.get_providers() == ["CPUExecutionProvider"]

    made = []

    class Session:  # onnxruntime-gpu's session, as far as the backend sees it
        def __init__(self, path, opts, providers):
            made.append(providers)
            self.started = [p if isinstance(p, str) else p[0] for p in providers]

        def get_providers(self):
            return self.started

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    load_backend(onnx_file, "cuda:1")
    assert made[-1] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    # listed but unable to start (CUDA libraries missing): onnxruntime would drop it to the CPU
    monkeypatch.setattr(Session, "get_providers", lambda self: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="could not start its CUDA provider"):
        load_backend(onnx_file, "cuda")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """tiny_run exported to ONNX under the default file name, model.onnx, in a folder of its own."""
    from imgclf.deploy.export import export

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    export(tiny_run, "onnx", out, parity_images=4, verbose=False)
    return out


def test_precision_is_a_serve_option_for_runs_and_refused_for_onnx(tiny_run, exported, capsys):
    import torch
    from fastapi.testclient import TestClient

    from imgclf.cli import build_parser, main
    from imgclf.deploy.server import load_backend
    from imgclf.errors import UserError

    assert build_parser().parse_args(["serve", str(tiny_run)]).precision == "fp32"
    assert load_backend(tiny_run, "cpu").clf.precision.dtype is None  # fp32: the exported model's answers
    backend = load_backend(tiny_run, "cpu", precision="bf16")
    assert backend.clf.precision.dtype == torch.bfloat16
    with TestClient(create_app(ServeConfig(model=str(tiny_run), precision="bf16"), backend=backend)) as c:
        assert c.get("/v1/model").json()["precision"] == "bf16"
    with pytest.raises(UserError, match="--precision must be one of fp32, auto, bf16, fp16"):
        ServeConfig(model=str(tiny_run), precision="fp8").check()
    for precision in ("auto", "bf16", "fp16"):
        with pytest.raises(UserError, match="an exported ONNX model runs in fp32; drop --precision") as e:
            load_backend(exported, "cpu", precision=precision)
        assert "\n" not in str(e.value)
    assert load_backend(exported, "cpu", precision="fp32").kind == "onnx"
    assert main(["serve", str(exported), "--precision", "bf16", "--port", "0"]) == 2
    cap = capsys.readouterr()
    assert "drop --precision" in cap.err and len(cap.err.strip().splitlines()) == 1 and "serving" not in cap.out


def test_onnx_model_is_named_after_its_run_and_an_unsuffixed_onnx_is_served(tiny_run, exported, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from imgclf.deploy.server import load_backend
    from imgclf.errors import UserError

    # every default export is a model.onnx: the run it came from is what tells them apart
    with TestClient(create_app(ServeConfig(model=str(exported)))) as c:
        info = c.get("/v1/model").json()
    assert info["backend"] == "onnx" and info["name"] == tiny_run.resolve().name != "model.onnx"

    # an ONNX export under another name ('export --out model.v2', a renamed download) is served
    for name in ("plainmodel", "model.onnx.v2"):
        plain = tmp_path / name
        shutil.copy(exported, plain)
        with TestClient(create_app(ServeConfig(model=str(plain)))) as c:
            assert c.get("/v1/model").json()["backend"] == "onnx"
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="serve a run folder"):
        load_backend(pickled)


def test_serve_options_must_be_finite_and_log_level_known(jpeg):
    from imgclf.cli import build_parser
    from imgclf.deploy.server import serve
    from imgclf.errors import UserError

    for bad, text in [(dict(max_wait_ms=float("inf")), "--max-wait-ms must be a finite number"),
                      (dict(max_wait_ms=float("nan")), "--max-wait-ms must be a finite number"),
                      (dict(max_wait_ms=-1.0), "--max-wait-ms"), (dict(max_wait_ms=1e12), "--max-wait-ms"),
                      (dict(max_body_mb=float("inf")), "--max-body-mb must be a finite number > 0"),
                      (dict(max_body_mb=float("nan")), "--max-body-mb must be a finite number > 0"),
                      (dict(max_body_mb=0.0), "--max-body-mb")]:
        with pytest.raises(UserError, match=text):
            create_app(ServeConfig(model="stub", **bad), backend=_FixedMultilabel())
        with pytest.raises(UserError, match=text):  # the CLI's path: refused before the port is taken
            serve(ServeConfig(model="stub", **bad), port=0)
    parser = build_parser()
    assert parser.parse_args(["serve", "m", "--log-level", "INFO"]).log_level == "info"
    assert parser.parse_args(["serve", "m"]).log_level == "warning"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--log-level", "loud"])
    with pytest.raises(UserError, match="--log-level must be one of critical, error, warning, info, debug, trace"):
        serve(ServeConfig(model="stub"), port=0, log_level="loud")


def _half_upload(url: str, sent: bytes = b"\xff" * 10, length: int = 1000):
    """A raw connection that declared ``length`` body bytes and sent only ``sent``, then went quiet."""
    import socket

    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
              + f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return s


def test_a_stalled_upload_gets_408_and_does_not_hold_up_shutdown(monkeypatch):
    import time

    from imgclf.deploy import server as srv

    # a Content-Length larger than the body (or a slowloris gone quiet): uvicorn has no body timeout
    with ServerThread(create_app(ServeConfig(model="stub", body_timeout_s=0.5), backend=_FixedMultilabel())) as url, \
            _half_upload(url) as s:
        s.settimeout(10)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request body incomplete: nothing received for 0.5 s after 10 bytes" in reply
        assert httpx.get(url + "/healthz").status_code == 200

    # SIGTERM / Ctrl-C (uvicorn's should_exit) with such a client connected: exits after the grace
    # period instead of waiting on the client for ever
    monkeypatch.setattr(srv, "SHUTDOWN_GRACE_S", 1)
    thread = ServerThread(create_app(ServeConfig(model="stub", body_timeout_s=60), backend=_FixedMultilabel()))
    with thread as url, _half_upload(url) as s:
        time.sleep(0.2)
        t0 = time.monotonic()
        thread.server.should_exit = True
        thread.thread.join(10)
        assert not thread.thread.is_alive() and time.monotonic() - t0 < 5
        s.settimeout(5)
        reply = s.recv(4096)  # a JSON 503, not uvicorn's plain-text 500 and a traceback in the log
        assert reply.startswith(b"HTTP/1.1 503") and b"server shutting down" in reply, reply[:200]


def test_a_client_that_leaves_frees_its_slots_and_its_image_is_not_classified(jpeg):
    import time

    backend = _Blocking()
    app = create_app(ServeConfig(model="stub", max_images=2, max_in_flight=2, max_wait_ms=0), backend=backend)
    in_flight, metrics = app.state.in_flight, app.state.metrics
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with _one_request_held(c, backend, jpeg):
            classified = metrics.images
            with _half_upload(url, jpeg, len(jpeg)):  # a whole request, whose client gives up waiting
                deadline = time.monotonic() + 10
                while in_flight["images"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert in_flight["images"] == 2
            deadline = time.monotonic() + 10
            while in_flight["images"] > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            # its slot is back while the model is still busy: the cap counts clients still waiting
            assert in_flight["images"] == 1
            assert c.post("/v1/predict", files=[("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(2)]
                          ).status_code == 503
        assert metrics.images == classified + 1  # the first request's image only
        text = c.get("/metrics").text
        assert metric(text, "imgclf_requests_total", path="/v1/predict", method="POST", status=499) == 1


def test_max_connections_refuses_uploads_past_it_before_reading_them(jpeg):
    backend = _Blocking()
    app = create_app(ServeConfig(model="stub", max_wait_ms=0), backend=backend)
    raw = dict(content=jpeg, headers={"content-type": "image/jpeg"})
    with ServerThread(app, max_connections=1) as url, httpx.Client(base_url=url, timeout=60) as c:
        with _one_request_held(c, backend, jpeg):
            with httpx.Client(base_url=url, timeout=30) as other:  # a second connection while one is open
                assert other.post("/v1/predict", **raw).status_code == 503
        assert c.post("/v1/predict", **raw).status_code == 200  # one at a time is allowed


class _Breakable(_FixedMultilabel):
    """A backend that can be broken: raise like a corrupted model or a lost GPU, or return NaN."""

    mode = "ok"

    def probs(self, images):
        if self.mode == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        p = super().probs(images)
        return np.full_like(p, np.nan) if self.mode == "nan" else p


def test_healthz_reports_a_model_that_fails_every_pass_and_its_recovery(jpeg):
    from fastapi.testclient import TestClient

    backend = _Breakable()
    raw = dict(content=jpeg, headers={"content-type": "image/jpeg"})
    with TestClient(create_app(ServeConfig(model="stub", max_wait_ms=0), backend=backend),
                    raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        backend.mode = "raise"
        r = c.post("/v1/predict", **raw)
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
        r = c.get("/healthz")  # was 200 for ever: a load balancer kept sending traffic to it
        assert r.status_code == 503
        assert r.json()["error"] == "the model fails (RuntimeError: CUDA error: an illegal memory access was encountered)"
        backend.mode = "nan"  # e.g. fp16 overflow: used to be a 200 with the bare token NaN (not JSON)
        r = c.post("/v1/predict", **raw)
        assert r.status_code == 500 and "NaN" not in r.text.replace("NaN or infinite", "")
        assert "NaN or infinite probabilities" in r.json()["error"]
        assert "NaN or infinite" in c.get("/healthz").json()["error"]
        backend.mode = "ok"  # the probe /healthz runs sees it recover, without waiting for traffic
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.post("/v1/predict", **raw).status_code == 200


def test_a_worker_stops_when_its_parent_is_killed():
    import inspect
    import signal
    import subprocess
    import sys
    import time

    from imgclf import procs
    from imgclf.deploy import server as srv

    # the worker: app_from_env's end_with_parent (imgclf.procs alone: its source is self-contained,
    # and importing the package costs torch's import), in a process whose parent (uvicorn's
    # supervisor) is then killed with -9; before, the workers went on serving the port as orphans
    worker = (inspect.getsource(procs) + "\nend_with_parent(os.getppid(), poll_s=0.05)\n"
              "print(os.getpid(), flush=True)\ntime.sleep(60)\n")
    parent = ("import os, subprocess, sys\n"
              f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.PIPE, text=True)\n"
              "print(w.stdout.readline().strip(), flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=30)
    assert p.returncode == -signal.SIGKILL
    pid = int(p.stdout.strip())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")
    # and a worker slow to import torch on a busy machine is not killed by uvicorn's 5 s health check
    assert srv.uvicorn_options().get("timeout_worker_healthcheck", srv.WORKER_HEALTHCHECK_S) >= 30


def _counter(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_add_up_every_workers_counts(jpeg, tmp_path, monkeypatch):
    """Under --workers N a scrape reaches one worker: /metrics still shows the server's totals (it
    showed that worker's own counts, which jumped between workers' values like counter resets)."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.server import METRICS_DIR_ENV

    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    raw = dict(content=jpeg, headers={"content-type": "image/jpeg"})
    ok = 'imgclf_requests_total{path="/v1/predict",method="POST",status="200"}'
    with TestClient(create_app(ServeConfig(model="stub"), backend=_FixedMultilabel())) as a, \
            TestClient(create_app(ServeConfig(model="stub"), backend=_FixedMultilabel())) as b:
        for _ in range(3):
            assert a.post("/v1/predict", **raw).status_code == 200
        for _ in range(2):
            assert b.post("/v1/predict", **raw).status_code == 200
        assert b.post("/v1/predict", content=b"not an image", headers={"content-type": "image/jpeg"}).status_code == 400
        time.sleep(1.3)  # each worker writes its counts within a second of its last request
        for c in (a, b):  # whichever worker answers the scrape
            text = c.get("/metrics").text
            assert _counter(text, ok) == 5
            assert _counter(text, "imgclf_images_total") == 5
            assert _counter(text, "imgclf_batch_size_count") >= 1
            assert _counter(text, 'imgclf_request_duration_seconds_count{path="/v1/predict"}') == 6
        assert len(list(tmp_path.glob("*.json"))) == 2
    monkeypatch.delenv(METRICS_DIR_ENV)
    with TestClient(create_app(ServeConfig(model="stub"), backend=_FixedMultilabel())) as c:  # one process: its own
        assert c.post("/v1/predict", **raw).status_code == 200
        assert _counter(c.get("/metrics").text, ok) == 1

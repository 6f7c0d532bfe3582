"""Deployment review, session 30: what a user of 'imgclf serve' and 'imgclf export' met.

- a deeply nested JSON body was a 500 with a traceback in the log (RecursionError);
- a misspelt query parameter (?topk=1), a repeated top_k, a multipart 'top_k' field or an image in a
  field the server does not read were ignored without a word: the answer looked as asked for;
- --opset outside torch's range, or one an op has no form at, printed hundreds of lines of the
  half-built graph above the error, and --opset 8 ended in a raw onnx.checker traceback;
- how to read the metadata embedded in an exported file was written nowhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    from imgclf.deploy.server import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(model=str(tiny_run), max_wait_ms=0))) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg(sample_dir) -> bytes:
    return sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0].read_bytes()


def _tops(r) -> list[int]:
    assert r.status_code == 200, r.text
    return [len(p["top"]) for p in r.json()["predictions"]]


def test_a_deeply_nested_json_body_is_a_400_and_the_server_goes_on(client, jpeg):
    for body in ("[" * 100_000 + "]" * 100_000, '{"images": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        r = client.post("/v1/predict", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text  # was 500 "internal error: RecursionError" and a traceback
        assert r.json() == {"error": "the JSON body does not parse: nested too deeply"}
    assert _tops(client.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"})) == [5]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_query_and_form_options_are_read_or_refused_never_ignored(client, jpeg, tiny_run, capsys):
    import imgclf
    from imgclf.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in the query string (?top_k=3), a form field or the JSON body" in text
    assert "An unknown query parameter, form field or JSON key is a 422, never ignored" in text

    file = {"file": ("cat.jpg", jpeg, "image/jpeg")}
    # a form field top_k (curl -F top_k=1, an HTML form) is honoured, as the JSON body's is
    assert _tops(client.post("/v1/predict", files=file, data={"top_k": "1"})) == [1]
    assert _tops(client.post("/v1/predict", files=file, data={"top_k": "2"}, params={"top_k": 2})) == [2]
    r = client.post("/v1/predict", files=file, data={"top_k": "3"})
    (want,) = imgclf.load(tiny_run, "cpu").predict([jpeg], top_k=3)
    got = r.json()["predictions"][0]["top"]
    assert [t["class"] for t in got] == [c for c, _ in want["top"]]
    assert np.allclose([t["prob"] for t in got], [p for _, p in want["top"]], atol=1e-5)
    refused = [
        (dict(files=file, params={"topk": 1}),
         "invalid request: unknown query parameter 'topk' (did you mean 'top_k'?); /v1/predict takes 'top_k'"),
        (dict(files=file, params={"top-k": 1}), "unknown query parameter 'top-k' (did you mean 'top_k'?)"),
        (dict(content=jpeg, headers={"content-type": "image/jpeg"}, params={"threshold": "0.5"}),
         "unknown query parameter 'threshold'"),
        (dict(files=file, params=[("top_k", 1), ("top_k", 3)]),
         "invalid request: top_k is given more than once in the query string"),
        (dict(files=file, data={"top_k": "1"}, params={"top_k": 2}),
         "invalid request: top_k is 2 in the query string and 1 in the form field: give it in one place"),
        (dict(files=file, data={"top_k": "abc"}), "form field top_k must be an integer from 1 to 1000, got \"abc\""),
        (dict(files=file, data={"top_k": "0"}), "form field top_k must be an integer from 1 to 1000, got 0"),
        (dict(files=file, data={"topk": "1"}),
         "multipart body: unknown field 'topk' (did you mean 'top_k'?); the accepted fields are 'file'"),
        # a second image in a field the server does not read came back as one prediction, not two
        (dict(files=[("file", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", jpeg, "image/jpeg"))]),
         "multipart body: unknown field 'image'"),
    ]
    for kwargs, text in refused:
        r = client.post("/v1/predict", **kwargs)
        assert r.status_code == 422 and text in r.json()["error"], (text, r.text)
        assert "\n" not in r.json()["error"]
    # what worked before still works: no field but the image's, the JSON body's own top_k
    assert _tops(client.post("/v1/predict", files=file, params={"top_k": 4})) == [4]
    r = client.post("/v1/predict", files={"other": ("x.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 400 and "no image in the multipart body" in r.json()["error"]


@pytest.mark.parametrize("opset,text", [
    (30, "--opset 30: this torch exports ONNX opsets 7 to "),
    (6, "--opset 6: this torch exports ONNX opsets 7 to "),
    # fastnet's AdaptiveMaxPool2d has no ONNX form at opset 7: torch's C++ printed the graph first
    (7, "ONNX export of fastnet failed at opset 7: ONNX export failed on adaptive_max_pool2d"),
    # Erf (exact GELU) is opset 9: a raw onnx.checker.ValidationError traceback before
    (8, "ONNX export of fastnet at opset 8 is not valid ONNX: No Op registered for Erf with domain_version of 8"),
])
def test_an_opset_that_cannot_work_is_one_line(tiny_run, tmp_path, capfd, opset, text):
    from imgclf.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run), "--opset", str(opset), "--parity-images", "2", "--out", str(out)]) == 2
    got = capfd.readouterr()
    assert got.out == "", got.out[:500]
    lines = got.err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], got.err[:500]
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_the_export_help_says_how_to_read_the_embedded_metadata(tiny_run, tmp_path, capsys):
    import onnxruntime as ort
    import torch

    from imgclf.cli import main
    from imgclf.deploy.export import export

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "metadata_props key 'imgclf'" in text and "custom_metadata_map['imgclf']" in text
    assert "_extra_files=extra" in text and "imgclf.json" in text
    # and what it says works: both files carry the sidecar's metadata, classes and preprocessing
    onnx_out, ts_out = tmp_path / "m.onnx", tmp_path / "m.torchscript.pt"
    export(tiny_run, "onnx", onnx_out, parity_images=2, verbose=False)
    export(tiny_run, "torchscript", ts_out, parity_images=2, verbose=False)
    sess = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    from_onnx = json.loads(sess.get_modelmeta().custom_metadata_map["imgclf"])
    extra = {"imgclf.json": ""}
    torch.jit.load(str(ts_out), _extra_files=extra)
    from_ts = json.loads(extra["imgclf.json"])
    assert from_onnx == json.loads((tmp_path / "m.onnx.json").read_text())
    assert from_ts == json.loads((tmp_path / "m.torchscript.pt.json").read_text())
    for meta in (from_onnx, from_ts):
        assert len(meta["classes"]) == 10 and meta["image_size"] == 32
        assert len(meta["mean"]) == len(meta["std"]) == 3 and meta["resize_details"]["size"] == [32, 32]


def test_out_under_a_file_says_which_file_is_in_the_way(tiny_run, tmp_path, capsys):
    # mkdir's errno came through as it was: "cannot write there (File exists)"
    from imgclf.cli import main

    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    for out in (tmp_path / "m.onnx" / "x.onnx", tmp_path / "m.onnx" / "a" / "x.onnx"):
        assert main(["export", str(tiny_run), "--parity-images", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"imgclf: error: --out {out}: cannot write there ({tmp_path / 'm.onnx'} is a file, not a folder)"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"an earlier export"


def test_health_answers_as_healthz(client):
    # was: a 404, where Kubernetes probes and load balancers are often set to /health
    assert client.get("/health").json() == client.get("/healthz").json() == {"status": "ok"}
    assert client.head("/health").status_code == 200

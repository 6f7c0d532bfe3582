"""Deployment fixes: TorchScript input checks, what an export holds, the server's JSON options and
all-bad answers, report and explain outputs."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from imgclf.errors import UserError


@pytest.fixture(scope="module")
def torchscript(tiny_run, tmp_path_factory):
    from imgclf.deploy.export import export

    out = tmp_path_factory.mktemp("ts") / "model.torchscript.pt"
    export(tiny_run, "torchscript", out, parity_images=4, verbose=False)
    return out


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_torchscript_export_refuses_input_of_another_size_or_dtype(tiny_run, torchscript):
    # a traced graph checks nothing: 64x64, 24x24 or float x/255 came out as confident, different
    # top-1s, where the ONNX export refuses them (INVALID_ARGUMENT)
    from imgclf.deploy.export import parity_images_for, reference_outputs
    from imgclf.runs import load_model

    model, meta = load_model(tiny_run, "cpu")
    images, _ = parity_images_for(tiny_run, meta, 5)
    mod = torch.jit.load(str(torchscript), map_location="cpu").eval()
    want, _ = reference_outputs(model, meta, images)
    with torch.no_grad():
        for n in (1, 5):  # the batch stays dynamic (traced at 2)
            logits, probs = mod(torch.from_numpy(images[:n]))
            assert np.allclose(logits.numpy(), want[:n], atol=1e-3) and probs.shape == (n, 10)
        bad = {"uint8 2 x 64 x 64 x 3": torch.zeros(2, 64, 64, 3, dtype=torch.uint8),
               "uint8 1 x 24 x 24 x 3": torch.zeros(1, 24, 24, 3, dtype=torch.uint8),
               "float32 5 x 32 x 32 x 3": torch.from_numpy(images).float() / 255,
               "uint8 5 x 3 x 32 x 32": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
               "uint8 32 x 32 x 3": torch.from_numpy(images[0])}
        for got, x in bad.items():
            with pytest.raises(Exception) as e:
                mod(x)
            # TorchScript prints its own traceback above it: the message itself is one line
            line = str(e.value).strip().splitlines()[-1]
            assert line.endswith("imgclf model input must be uint8 RGB pixels (0-255, not x/255) of shape "
                                 "N x 32 x 32 x 3, resized to 32x32 as the metadata's resize_details says; "
                                 f"got {got}"), line
    extra = {"imgclf.json": ""}
    torch.jit.load(str(torchscript), _extra_files=extra)
    assert "is refused" in json.loads(extra["imgclf.json"])["exported_with"]


def test_export_says_what_is_in_the_graph_and_how_to_resize(tiny_run, capsys):
    # the help and the README said "preprocessing inside", but the graph takes the trained size:
    # an image resized another way (PIL bilinear) gave 70/80 top-1 agreement
    from pathlib import Path

    from imgclf.cli import main
    from imgclf.deploy.export import export_metadata
    from imgclf.runs import read_meta

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "It does not resize: resize each image to S x S exactly as the metadata key resize_details says" in text
    assert "uint8 -> (x/255 - mean)/std, the network, softmax (sigmoid for multi-label) of logits / temperature" in text
    run_dir, meta = read_meta(tiny_run)
    xmeta = export_metadata(meta, run_dir, "test")
    details = xmeta["resize_details"]  # enough on its own: the target size too, not only the policy
    assert details["size"] == [32, 32] and details["policy"] == meta["resize"] and "32 x 32 x 3" in details["output"]
    assert "the graph does not resize" in xmeta["input"]["preprocessing_outside_graph"]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "preprocessing inside" not in readme and "resize_details" in readme


@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    from imgclf.deploy.server import ServeConfig, create_app

    # max_pixels low enough for a 400x400 PNG to be "too large" without building a bomb
    with TestClient(create_app(ServeConfig(model=str(tiny_run), max_wait_ms=0, max_pixels=100_000))) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg(sample_dir) -> bytes:
    return sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0].read_bytes()


def _png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_request_whose_every_image_is_bad_names_every_error(client, jpeg):
    # only the first image's error came back: why the second failed was lost
    cut = ("files", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))
    text = ("files", ("t.jpg", b"text", "image/jpeg"))
    r = client.post("/v1/predict", files=[cut, text])
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"].startswith("none of the 2 images could be read: image 0 ('cut.jpg'): truncated or corrupt")
    assert "; image 1 ('t.jpg'): not an image file" in body["error"] and "\n" not in body["error"]
    # entries shaped as a bad image's among good ones
    mixed = client.post("/v1/predict", files=[("files", ("a.jpg", jpeg, "image/jpeg")), cut]).json()["predictions"][1]
    assert [set(e) for e in body["errors"]] == [set(mixed)] * 2
    assert [(e["filename"], e["status"]) for e in body["errors"]] == [("cut.jpg", 400), ("t.jpg", 400)]
    assert body["errors"][0]["error"] == mixed["error"].replace("image 1", "image 0")
    assert "not an image file" in body["errors"][1]["error"]
    # all too large: their own status; mixed reasons: 400
    big = [("files", (f"big{i}.png", _png(400), "image/png")) for i in range(2)]
    r = client.post("/v1/predict", files=big)
    assert r.status_code == 413 and [e["status"] for e in r.json()["errors"]] == [413, 413]
    r = client.post("/v1/predict", files=[big[0], text])
    assert r.status_code == 400 and [e["status"] for e in r.json()["errors"]] == [413, 400]
    # one image: its error as before, and the list as well
    r = client.post("/v1/predict", content=b"text", headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body: not an image file")
    assert r.json()["errors"] == [{"filename": "body", "error": r.json()["error"], "status": 400}]


def test_top_k_in_a_json_body_is_honoured_and_unknown_keys_refused(client, jpeg):
    b64 = base64.b64encode(jpeg).decode()

    def tops(r):
        assert r.status_code == 200, r.text
        return [len(p["top"]) for p in r.json()["predictions"]]

    # silently ignored before: five classes came back
    assert tops(client.post("/v1/predict", json={"images": [b64, b64], "top_k": 1})) == [1, 1]
    assert tops(client.post("/v1/predict", json={"image": b64, "top_k": 3})) == [3]
    assert tops(client.post("/v1/predict", params={"top_k": 2}, json={"image": b64})) == [2]
    assert tops(client.post("/v1/predict", params={"top_k": 2}, json={"image": b64, "top_k": 2})) == [2]
    refused = [({"params": {"top_k": 2}}, {"image": b64, "top_k": 1},
                "invalid request: top_k is 2 in the query string and 1 in the JSON body: give it in one place"),
               ({}, {"images": [b64], "topk": 1}, "JSON body: unknown key 'topk' (did you mean 'top_k'?); the accepted "
                                                  "keys are 'images' (a list of base64 strings), 'image' (one) and 'top_k'"),
               ({}, {"img": b64}, "JSON body: unknown key 'img' (did you mean 'image'?)"),
               ({}, {"images": [b64], "threshold": 0.5}, "unknown key 'threshold'; the accepted keys are"),
               ({}, {"images": [b64], "image": b64}, "give 'images' (a list) or 'image' (one), not both")]
    refused += [({}, {"image": b64, "top_k": k}, f"body.top_k must be an integer from 1 to 1000, got {json.dumps(k)}")
                for k in (0, 1001, "3", True, 2.5, None)]
    for kwargs, doc, text in refused:
        r = client.post("/v1/predict", json=doc, **kwargs)
        assert r.status_code == 422 and text in r.json()["error"], (doc if len(str(doc)) < 80 else text, r.text)
        assert "\n" not in r.json()["error"]


def test_report_out_must_be_html(tiny_run, tmp_path, capsys):
    # --out x.pdf wrote HTML under a .pdf name
    from imgclf.cli import main
    from imgclf.evaluate.report import write_report

    for name, fix in (("x.pdf", "x.html"), ("report", "report.html"), ("r.png", "r.html")):
        with pytest.raises(UserError, match=f"it is an HTML page, so name it {fix}$"):
            write_report(tiny_run, device="cpu", out=tmp_path / name)
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "x.pdf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "name it x.html" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_explain_leaves_no_empty_folder_when_nothing_was_written(tiny_run, sample_dir, tmp_path):
    from imgclf.evaluate.explain import explain

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    res = explain(tiny_run, [corrupt], out=tmp_path / "d" / "e", device="cpu")
    assert "error" in res[0] and not (tmp_path / "d").exists()
    # a folder that was there before stays, and one that got a PNG keeps it
    (tmp_path / "mine").mkdir()
    explain(tiny_run, [corrupt], out=tmp_path / "mine", device="cpu")
    assert (tmp_path / "mine").is_dir()
    good = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0]
    res = explain(tiny_run, [corrupt, good], out=tmp_path / "f", device="cpu")
    assert [p.name for p in (tmp_path / "f").iterdir()] == [f"{good.stem}_gradcam.png"] and "output" in res[1]

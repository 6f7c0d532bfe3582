"""Grad-CAM on imgclf's nets and a timm CNN, on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.errors import UserError
from imgclf.evaluate.explain import GradCAM, explain, find_target_layer


def _images(sample_dir, n=2):
    return [sorted((sample_dir / "test" / c).glob("*.jpg"))[0] for c in ("cat", "ship", "horse")[:n]]


def test_explain_writes_overlays_with_a_real_heatmap(tiny_run, sample_dir, tmp_path):
    res = explain(tiny_run, _images(sample_dir), out=tmp_path, device="cpu")
    assert len(res) == 2
    for r in res:
        heat = r["heatmap"]
        assert heat.shape == (32, 32)  # the model's input size
        assert heat.std() > 0.05 and heat.min() == pytest.approx(0) and heat.max() == pytest.approx(1)
        with Image.open(r["output"]) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 224
        assert r["layer"] == "layers" and r["class"] == r["top"][0][0]


def test_explain_a_named_class_and_layer(tiny_run, sample_dir, tmp_path):
    a = explain(tiny_run, _images(sample_dir, 1), class_name="truck", layer="layers.1", out=tmp_path, device="cpu")[0]
    b = explain(tiny_run, _images(sample_dir, 1), class_name="cat", layer="layers.1", out=tmp_path, device="cpu")[0]
    assert a["class"] == "truck" and a["layer"] == "layers.1" and a["heatmap"].shape == (32, 32)
    assert not np.allclose(a["heatmap"], b["heatmap"])  # different classes, different evidence
    # each call keeps its own PNG: the class and layer named are in the file name
    c = explain(tiny_run, _images(sample_dir, 1), out=tmp_path, device="cpu")[0]
    names = {Path(r["output"]).name for r in (a, b, c)}
    stem = _images(sample_dir, 1)[0].stem
    assert names == {f"{stem}_gradcam_truck_layers.1.png", f"{stem}_gradcam_cat_layers.1.png", f"{stem}_gradcam.png"}
    assert all(Path(r["output"]).is_file() for r in (a, b, c))


def test_unknown_layer_is_a_one_line_error_listing_candidates(tiny_run, sample_dir, tmp_path):
    with pytest.raises(UserError) as e:
        explain(tiny_run, _images(sample_dir, 1), layer="layer9", out=tmp_path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "unknown layer 'layer9'" in msg and "layers.2" in msg and "whiten" in msg


def test_unknown_class_is_a_user_error(tiny_run, sample_dir, tmp_path, capsys):
    from imgclf.cli import main

    assert main(["explain", str(tiny_run), str(_images(sample_dir, 1)[0]), "--class", "unicorn",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unicorn" in err and "airplane" in err  # names the run's classes


def test_explain_command(tiny_run, sample_dir, tmp_path, capsys):
    from imgclf.cli import main

    assert main(["explain", str(tiny_run), *map(str, _images(sample_dir)), "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("_gradcam.png") == 2
    assert len(list(tmp_path.glob("*_gradcam.png"))) == 2


def _real_batch(sample_dir, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    from imgclf.data.augment import Normalize
    from imgclf.data.images import load_resized

    x = np.stack([load_resized(str(p), 32, "stretch") for p in _images(sample_dir, 3)])
    return Normalize(mean, std, "cpu")(torch.from_numpy(x))


@pytest.mark.parametrize("arch,layer", [("timm:resnet18", "layer4"), ("plaincnn", "features")])
def test_gradcam_on_timm_and_plain_cnns(arch, layer, sample_dir):
    from imgclf.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, 32).eval()
    cam = GradCAM(model, 32, "cpu")
    assert cam.layer == layer  # the last conv stage, before global pooling / flatten
    assert cam.where() == f"layer '{layer}' (4x4 cells)" if arch == "timm:resnet18" else cam.where().endswith("cells)")
    heat, logits = cam(_real_batch(sample_dir))
    assert heat.shape == (3, 32, 32) and logits.shape == (3, 10)
    # untrained weights: a map may be all-negative (ReLU'd to zero), but not every one
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert max(h.std() for h in heat) > 0.01


def test_a_model_without_feature_maps_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(UserError, match="convolutional feature map"):
        find_target_layer(mlp, 8, "cpu")


def test_out_naming_an_existing_file_is_a_one_line_error(tiny_run, sample_dir, tmp_path, capsys):
    from imgclf.cli import main

    taken = tmp_path / "notes.txt"
    taken.write_text("not a folder")
    with pytest.raises(UserError, match="is a file: name a folder"):
        explain(tiny_run, _images(sample_dir, 1), out=taken, device="cpu")
    assert main(["explain", str(tiny_run), str(_images(sample_dir, 1)[0]), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err
    assert taken.read_text() == "not a folder"


def test_a_wide_image_gets_a_figure_of_its_shape_and_the_title_says_what_the_layer_is(tiny_run, sample_dir, tmp_path):
    # a 3:1 crop in the square layout left most of the PNG blank; "at layers" named the module
    # without saying it is one (fastnet's last stage is called 'layers')
    photo = np.asarray(Image.open(_images(sample_dir, 1)[0]).convert("RGB").resize((96, 32)))
    Image.fromarray(photo).save(tmp_path / "wide.png")
    Image.fromarray(photo[:, :32]).save(tmp_path / "square.png")
    wide, square = explain(tiny_run, [tmp_path / "wide.png", tmp_path / "square.png"], out=tmp_path / "x", device="cpu")
    with Image.open(wide["output"]) as w, Image.open(square["output"]) as q:
        assert w.width == q.width and w.height < 0.6 * q.height
    import imgclf

    assert GradCAM(imgclf.load(tiny_run, device="cpu").model, 32, "cpu").where() == "layer 'layers' (3x3 cells)"


def test_explain_reads_archives_in_place_as_predict_does(tiny_run, sample_dir, tmp_path, capsys):
    """A .zip and a .tar.gz of photos are explained member by member, nothing extracted; a member
    that is no image is reported by its <archive>/<member> name and the others still get PNGs."""
    import tarfile
    import zipfile

    from imgclf.cli import main

    cat, ship = _images(sample_dir)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.write(cat, "a/cat.jpg")
        zf.writestr("a/broken.jpg", b"not a jpeg")
    with tarfile.open(tmp_path / "more.tar.gz", "w:gz") as tf:
        tf.add(ship, "b/ship.jpg")
    out = tmp_path / "out"
    res = explain(tiny_run, [tmp_path / "photos.zip", tmp_path / "more.tar.gz"], out=out, device="cpu")
    assert [r["input"] for r in res] == [f"{tmp_path}/photos.zip/a/broken.jpg", f"{tmp_path}/photos.zip/a/cat.jpg",
                                         f"{tmp_path}/more.tar.gz/b/ship.jpg"]
    assert "error" in res[0] and "heatmap" not in res[0]
    assert sorted(p.name for p in out.iterdir()) == ["cat_gradcam.png", "ship_gradcam.png"]
    # the same heat map as the file itself gives
    direct = explain(tiny_run, [cat], out=tmp_path / "direct", device="cpu")[0]
    assert np.allclose(res[1]["heatmap"], direct["heatmap"]) and res[1]["top"] == direct["top"]
    assert main(["explain", str(tiny_run), str(tmp_path / "photos.zip"), "--out", str(out), "--device", "cpu"]) == 1
    printed = capsys.readouterr().out
    assert f"{tmp_path}/photos.zip/a/broken.jpg\tERROR" in printed
    assert "-> " + str(out / "cat_gradcam.png") in printed

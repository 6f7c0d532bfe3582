"""PlainCNN as a Keras user meets it: a net too deep for the image size, model_args checking,
the accepted keys in the unknown-key error, and a Keras-like layer summary."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from imgclf.errors import UserError
from imgclf.models.registry import build_model


def _one_line_error(args: dict, size: int = 32) -> str:
    with pytest.raises(UserError) as e:
        build_model("plaincnn", 10, size, args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_too_deep_for_the_image_size_is_one_line_at_build_time():
    from imgclf.models.nets import plaincnn_max_blocks
    from imgclf.models.registry import check_buildable

    # 6 pools of a 32-px image: torch warned about a zero-size Linear, then max-pooling a 1x1
    # map failed in the first step with 'Output size is too small'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's zero-element warning is gone too
        msg = _one_line_error({"channels": [16] * 6})
    assert "32-px images allow at most 5" in msg
    assert "fewer blocks" in msg and "--image-size (at least 64 for 6 blocks)" in msg
    with pytest.raises(UserError, match="allow at most 5"):  # the same check, no weights allocated
        check_buildable("plaincnn", 32, {"channels": [16] * 6})
    assert plaincnn_max_blocks(32) == 5 and plaincnn_max_blocks(31) == 4 and plaincnn_max_blocks(64) == 6
    m = build_model("plaincnn", 10, 32, {"channels": [8] * 5, "dense": []})  # the most that fit
    assert m.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    build_model("plaincnn", 10, 64, {"channels": [8] * 6})


def test_even_kernel_flatten_size_matches_the_feature_map():
    # padding k//2 grows the map a pixel per even-kernel conv: flatten's Linear was sized for
    # the unpadded map (a shape error in the first step)
    m = build_model("plaincnn", 3, 32, {"channels": [8, 8], "kernel_size": 2, "head": "flatten"})
    assert m.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_a_single_number_is_a_list_of_one():
    a = build_model("plaincnn", 10, 32, {"dense": 512, "channels": 16})
    b = build_model("plaincnn", 10, 32, {"dense": [512], "channels": [16]})
    assert str(a) == str(b)
    assert [m.out_features for m in a.classifier if isinstance(m, torch.nn.Linear)] == [512, 10]


@pytest.mark.parametrize(("args", "expected"), [
    ({"head": "xyz"}, "head='xyz': use auto .*, flatten or avg"),
    ({"dense_dropout": -0.1}, "dense_dropout=-0.1: a dropout rate is a fraction from 0"),
    ({"dropout": -1}, "dropout=-1: a dropout rate"),
    ({"dropout": 1.5}, "dropout=1.5: a dropout rate"),
    ({"dropout": 1}, "dropout=1: a dropout rate"),  # drops everything
    ({"channels": "32,64"}, r"channels='32,64': expected a list .* e\.g\. channels=\[32,64\]"),
    ({"channels": [32, 0]}, r"channels=\[32, 0\]: expected a list of whole numbers >= 1"),
    ({"dense": [64, -1]}, r"dense=\[64, -1\]: expected"),
    ({"convs_per_block": 0}, "convs_per_block=0: expected a whole number >= 1"),
    ({"kernel_size": 2.5}, "kernel_size=2.5: expected a whole number"),
    ({"activation": "tanh"}, "activation='tanh': use one of relu, gelu"),
])
def test_bad_values_are_refused_in_one_line(args, expected):
    msg = _one_line_error(args)
    assert msg.startswith("plaincnn: ")
    assert re.search(expected, msg), msg


def test_unknown_argument_lists_the_keys_with_defaults():
    msg = _one_line_error({"dropuot": 0.1, "width": 1.5})
    assert "dropuot, width not known to PlainCNN (did you mean dropout" in msg
    assert "channels=[32, 64, 128]" in msg and "dropout=0.25" in msg and "dense=[256]" in msg
    assert "head=auto" in msg and "batchnorm=true" in msg
    assert "num_classes" not in msg and "image_size" not in msg
    with pytest.raises(UserError, match="not known to PlainCNN"):  # given by the builder, not a model argument
        build_model("plaincnn", 10, 32, {"image_size": 64})
    with pytest.raises(UserError, match=r"FastNet; it takes \(default values\): widths=\[64, 256, 256\], width=1"):
        build_model("fastnet", 10, 32, {"channels": [32]})


def _table_params(text: str) -> int:
    lines = text.splitlines()
    rules = [i for i, ln in enumerate(lines) if ln and set(ln) == {"="}]
    rows = lines[rules[1] + 1 : rules[2]]  # between the header's rule and the totals'
    assert rows
    return sum(int(ln.rsplit(None, 1)[1].replace(",", "")) for ln in rows)


def test_summary_of_plaincnn_and_fastnet():
    from imgclf.models.summary import summary

    m = build_model("plaincnn", 10, 32, {"channels": [16, 32], "dense": [64]})
    m.train()
    text = summary(m, 32)
    assert m.training  # the mode it had
    total = sum(p.numel() for p in m.parameters())
    assert f"Total params: {total:,}" in text and "Non-trainable params: 0" in text
    assert _table_params(text) == total
    lines = text.splitlines()
    assert any(ln.startswith("features.0 (Conv2d)") and "(None, 16, 32, 32)" in ln and "432" in ln for ln in lines)
    assert any(ln.startswith("features.14 (MaxPool2d)") and "(None, 32, 8, 8)" in ln for ln in lines)
    assert any(ln.startswith("pool (Flatten)") and "(None, 2048)" in ln for ln in lines)
    assert any(ln.startswith("classifier.3 (Linear)") and "(None, 10)" in ln and "650" in ln for ln in lines)

    f = build_model("fastnet", 10, 32, {})
    text = summary(f, (3, 32, 32))
    total = sum(p.numel() for p in f.parameters())
    frozen = sum(p.numel() for p in f.parameters() if not p.requires_grad)
    assert frozen and f"Non-trainable params: {frozen:,}" in text and f"Total params: {total:,}" in text
    assert _table_params(text) == total  # its shared GELU, called once per group, counted once
    assert any(ln.startswith("head (Linear)") and "(None, 10)" in ln for ln in text.splitlines())
    top = summary(f, 32, depth=1)
    assert [ln.split()[0] for ln in top.splitlines()[4:9]] == ["whiten", "act", "layers", "pool", "head"]
    assert _table_params(top) == total

    with pytest.raises(ValueError, match="does not pass through PlainCNN"):  # flatten fixes the input size
        summary(m, 64)


def test_write_summary_never_fails_the_run(tmp_path):
    from imgclf.models.summary import write_summary

    m = build_model("plaincnn", 10, 32, {"channels": [8], "dense": [], "head": "flatten"})
    assert write_summary(m, 32, tmp_path / "model.txt")
    text = (tmp_path / "model.txt").read_text()
    assert "Total params:" in text and "Conv2d(3, 8, kernel_size=(3, 3)" in text  # the table and str(model)
    assert not write_summary(m, 64, tmp_path / "bad.txt") and not (tmp_path / "bad.txt").exists()
    assert not write_summary(m, 32, tmp_path / "missing" / "model.txt")

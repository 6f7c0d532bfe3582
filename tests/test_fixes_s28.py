"""Fine-tuning keeps the pretrained BatchNorm statistics on small data (--freeze-bn), and a run's
own config.yaml (a sweep trial's above all) is repeated in a new folder, never over the run."""

from __future__ import annotations

import json

import pytest
import torch

import imgclf
from imgclf.errors import UserError
from imgclf.models import pretrained

FAST = dict(progress=False, tensorboard=False, final_eval=False, tta=False)


def _lite0_reference() -> dict[str, torch.Tensor]:
    import timm

    backbone = timm.create_model("efficientnet_lite0", num_classes=0, **pretrained.LITE_ARCH_ARGS)
    state = pretrained.map_lite_keys(pretrained.read_state_dict(pretrained.lite_package_file("efficientnet_lite0")),
                                     backbone)
    pretrained.load_into(backbone, state, "lite0", drop=("classifier.",))
    return backbone.state_dict()


@pytest.mark.parametrize("freeze_bn", [None, False])
def test_a_small_fine_tune_keeps_the_pretrained_batchnorm_statistics(few, tmp_path, freeze_bn):
    # Lite0 on ~100 photos lost accuracy at every unfreeze: the running statistics re-estimated from
    # a few augmented batches replaced ImageNet's (0.22 vs 0.48 test top-1 on 400 CIFAR photos)
    opts = {} if freeze_bn is None else {"freeze_bn": freeze_bn}
    res = imgclf.train(data=str(few), model="efficientnet_lite0", pretrained=True, image_size=32, epochs=2,
                       freeze_epochs=1, batch_size=16, project=str(tmp_path), name="ft", **FAST, **opts)
    assert res.config.freeze_bn is (freeze_bn is None)  # auto: on under 5000 training images
    ref = _lite0_reference()
    # the last epoch's weights (the kept ones may be the head-only epoch's, when it scored best)
    last = torch.load(res.run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    got = {k.removeprefix("backbone."): v for k, v in last.items() if k.startswith("backbone.")}
    stats = [k for k in ref if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50
    same = [k for k in stats if torch.equal(got[k], ref[k])]
    # the backbone did train after the unfreeze: its filters and BN scales moved either way
    assert not torch.equal(got["blocks.6.0.conv_pwl.weight"], ref["blocks.6.0.conv_pwl.weight"])
    assert not torch.equal(got["bn2.weight"], ref["bn2.weight"])
    if freeze_bn is None:
        assert same == stats
    else:
        assert not same


def test_a_trials_config_is_trained_as_a_new_run_not_over_the_trial(few, tmp_path, monkeypatch, caplog):
    from imgclf.tune.sweep import TRIAL_MARKER

    monkeypatch.chdir(tmp_path)
    trial = imgclf.train(data=str(few), epochs=1, project=str(tmp_path / "study" / "trials"), name="15",
                         exist_ok=True, **FAST).run_dir
    (trial / TRIAL_MARKER).write_text(json.dumps({"study": "s2", "trial": 15}))  # what the sweep writes there
    before = (trial / "metrics.csv").read_text()
    res = imgclf.train(config=str(trial / "config.yaml"), epochs=2, final_eval=False)
    assert res.run_dir.resolve() != trial.resolve() and res.run_dir.parent.resolve() == (tmp_path / "runs").resolve()
    assert (trial / "metrics.csv").read_text() == before  # the trial is as the sweep left it
    assert len(res.history) == 2
    assert res.config.tensorboard and not res.config.exist_ok  # train's own defaults, not the sweep's
    # a run made with --exist-ok, repeated from its config.yaml: refused, as any existing folder is
    run = imgclf.train(data=str(few), epochs=1, project=str(tmp_path / "r"), name="a", exist_ok=True, **FAST).run_dir
    before = (run / "metrics.csv").read_text()
    with pytest.raises(UserError, match=r"run folder .*a already exists"):
        imgclf.train(config=str(run / "config.yaml"), epochs=2)
    assert (run / "metrics.csv").read_text() == before
    # asked for in so many words, it is still done
    again = imgclf.train(config=str(run / "config.yaml"), epochs=1, exist_ok=True, **FAST)
    assert again.run_dir.resolve() == run.resolve()

"""Two sweep workers at once on one PostgreSQL study: every trial is recorded once, none is
lost, and each has its own run folder. Needs a server: ``eval "$(bash .ci/postgres.sh)"``."""

from __future__ import annotations

import os
import uuid

import pytest
import yaml

from imgclf.cli import main
from imgclf.config import make_config
from imgclf.tune import sweep

URL = os.environ.get("IMGCLF_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(
    not URL, reason="IMGCLF_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a local server and prints it)")


def test_two_workers_share_one_postgres_study(small_sample, tmp_path):
    import optuna

    name = f"pg-{uuid.uuid4().hex[:10]}"
    n_trials = 6
    study = {
        "name": name, "directory": str(tmp_path / "studies"), "storage": URL,
        "base": {"data": str(small_sample), "model": "plaincnn", "optimizer": "adam", "epochs": 2, "image_size": 32,
                 "batch_size": 32, "model_args": {"channels": [8, 16], "dense": [32]}},
        "space": {"lr": {"low": 1e-4, "high": 3e-3, "log": True}, "model_args.dropout": {"low": 0.0, "high": 0.5}},
        "sampler": "random", "pruner": {"type": "median", "n_startup_trials": 2}, "n_trials": n_trials, "seed": 0,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    try:
        assert main(["sweep", str(path), "--workers", "2"]) == 0
        spec = sweep.load_spec(path)
        trials = sorted(sweep.open_study(spec, heartbeat=False).get_trials(), key=lambda t: t.number)
        numbers = [t.number for t in trials]
        # two workers may both start a trial when one is left: at most one extra, never a lost one
        assert numbers == list(range(len(trials))) and n_trials <= len(trials) <= n_trials + 1
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
        folders = {int(p.name) for p in (spec.study_dir / "trials").iterdir()}
        assert folders == set(numbers)  # one run folder per trial, none without its trial
        for t in trials:
            cfg = make_config(spec.study_dir / "trials" / str(t.number) / "config.yaml")
            assert cfg.lr == pytest.approx(t.params["lr"])
        assert len({t.params["lr"] for t in trials}) == len(trials)  # the workers drew different points
    finally:
        try:
            optuna.delete_study(study_name=name, storage=sweep.make_storage(URL, heartbeat=None))
        except KeyError:
            pass

"""Data-parallel training on CPU: 2 gloo processes spawned by ``--devices 2`` against 1 process.

The run is set up so that the two must agree to float rounding:
- batch_size is the global batch: each rank takes 16 of every 32, and DDP averages the two
  halves' gradients, which is the 1-process gradient of the same 32 images;
- no BatchNorm: each rank would normalise with its own shard's statistics (--sync-bn fixes that,
  but SyncBatchNorm has no CPU kernel);
- no dropout and no random augmentation: each rank draws its own random numbers, so those
  would differ from the 1-process draws by design;
- fp32: bf16 autocast rounding would swamp the comparison.
What remains is the order of float additions (two half-batch sums, then an all-reduce), so
the weights after 2 epochs (22 steps) agree to ~1e-6; the test allows 1e-4.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import imgclf
import imgclf.errors
from imgclf.engine.callbacks import Callback

TOLERANCE = 1e-6  # measured: ~1e-8 (fp32 rounding of the gradient all-reduce)


def _options(small_sample, project, **extra) -> dict:
    # SGD, not the recipe's AdamW: Adam divides by sqrt(v), so coordinates whose gradient is ~0
    # (a tiny net near chance) turn rounding-level differences between one and two processes into
    # lr-sized steps (measured 1.7e-4 on one split of this data, 3e-8 on another); SGD keeps them
    # at rounding level, so a real sharding or reduction bug stands out
    return dict(data=str(small_sample), model="plaincnn", image_size=32, epochs=2, batch_size=32,
                model_args={"channels": [8, 16], "dense": [], "dropout": 0.0, "batchnorm": False},
                precision="fp32", flip=False, translate=0, tta=False, tensorboard=False, progress=False,
                optimizer="sgd", project=str(project), device="cpu", **extra)


def _weights(run_dir) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


class Crash(Callback):
    """Simulates a killed run: fails in the first step of epoch ``epoch`` (after epoch-1's checkpoint)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, t, epoch):
        self.current = epoch

    def on_step_end(self, t):
        if self.current + 1 == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def runs(small_sample, tmp_path_factory):
    one = imgclf.train(**_options(small_sample, tmp_path_factory.mktemp("one")))
    project = tmp_path_factory.mktemp("two")
    two = imgclf.train(**_options(small_sample, project, devices=2))
    return one, two, project


def test_two_processes_match_one(runs):
    one, two, project = runs
    assert [p.name for p in project.iterdir()] == [two.run_dir.name]  # exactly one run folder
    for f in ("model.safetensors", "model.json", "metrics.csv", "config.yaml", "last.pt", "summary.json"):
        assert (two.run_dir / f).exists(), f
    assert two.config.devices == 2 and two.config.batch_size == 32
    diff = _max_diff(_weights(one.run_dir), _weights(two.run_dir))
    assert diff < TOLERANCE, f"max |w1 - w2| = {diff:.3g}"
    # metrics are reduced over both ranks: the whole training set, not rank 0's half
    for a, b in zip(one.history, two.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-6)
    assert two.test["n"] == one.test["n"] == 100


@pytest.mark.slow
def test_distributed_resume(runs, small_sample, tmp_path):
    _, two, _ = runs
    litter = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    with pytest.raises(Exception, match="simulated crash"):
        imgclf.train(**_options(small_sample, tmp_path, devices=2, name="crashed"), callbacks=[Crash(2)])
    # the workers' tracebacks reached the parent and nothing was left in the temp folder
    assert set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*")) == litter
    run = tmp_path / "crashed"
    assert (run / "last.pt").exists() and not (run / "model.safetensors").exists()
    res = imgclf.train(resume=run, progress=False)
    assert res.run_dir == run and len(res.history) == 2
    diff = _max_diff(_weights(two.run_dir), _weights(run))
    assert diff < TOLERANCE, f"max |w_resumed - w_uninterrupted| = {diff:.3g}"


def test_global_batch_must_divide(small_sample, tmp_path):
    with pytest.raises(imgclf.errors.UserError, match="global batch"):
        imgclf.train(**{**_options(small_sample, tmp_path, devices=2), "batch_size": 33})


def test_time_limit_two_processes_plan_one_length(small_sample, tmp_path):
    # both ranks must step the same number of times (a rank that stopped early would hang the
    # other in its next all-reduce); the budget counts from this call, process start-up included
    import time

    budget = 40.0
    t0 = time.perf_counter()
    res = imgclf.train(**{**_options(small_sample, tmp_path, devices=2), "epochs": None, "time_limit": budget})
    assert time.perf_counter() - t0 <= budget + 3.0
    assert res.config.time_limit == budget and len(res.history) == np.ceil(res.config.epochs) >= 2
    assert (res.run_dir / "model.safetensors").exists() and res.test["n"] == 100


def test_head_only_phase_in_two_processes(small_sample, tmp_path):
    # DDP registers the backbone's parameters as trained; FreezeBackbone then freezes them for
    # the first epoch, so their gradients never arrive: DDP must be told to expect that, or the
    # second step fails ("Expected to have finished reduction in the prior iteration")
    res = imgclf.train(data=str(small_sample), model="timm:resnet18", head=[32], freeze_epochs=1, epochs=2,
                       batch_size=32, image_size=32, precision="fp32", tta=False, tensorboard=False,
                       progress=False, project=str(tmp_path), devices=2, device="cpu")
    assert len(res.history) == 2 and res.test["n"] == 100


# -- multi-label validation: mAP over the whole val split on every rank --------------------------


def _gather_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from imgclf.engine.distributed import gather_rows

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = torch.arange(3 - rank, dtype=torch.float32).view(-1, 1).repeat(1, 4) + 10 * rank  # 3 rows, then 2
        got = gather_rows(rows, torch.device("cpu"))
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_joins_unequal_shards_in_rank_order(tmp_path):
    import torch
    import torch.multiprocessing as tmp

    from imgclf.engine.distributed import free_port

    tmp.start_processes(_gather_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    expected = torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4, [10.0] * 4, [11.0] * 4])
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


class RecordValMap(Callback):
    """Writes each rank's val_map, and on rank 0 the mAP of the same weights on the whole val split."""

    def __init__(self, out: str):
        self.out = out

    def on_epoch_end(self, t, row):
        import json

        import torch

        from imgclf.data.loader import BatchLoader
        from imgclf.evaluate.inference import logits_for_loader
        from imgclf.evaluate.multilabel_metrics import mean_average_precision

        rank = t.train_loader.rank
        rec = {"val_map": row["val_map"]}
        if rank == 0:
            whole = BatchLoader(t.val_loader.data, 64, t.device, shuffle=False)
            logits, labels = logits_for_loader(t.eval_model(), whole, t.normalize, t.precision, t.device)
            rec["whole"] = mean_average_precision(torch.sigmoid(logits).numpy(), labels.numpy())
        Path(self.out, f"rank{rank}.json").write_text(json.dumps(rec))


def test_multilabel_val_map_is_the_whole_val_splits_on_every_rank(small_sample, tmp_path):
    # val_map is the multi-label monitor (early stopping, plateau, best checkpoint): a rank
    # scoring only its own shard took its own decisions, and the ranks hung or drifted apart
    import json

    rec = tmp_path / "rec"
    rec.mkdir()
    imgclf.train(**{**_options(small_sample, tmp_path / "runs", devices=2), "epochs": 1, "task": "multilabel"},
                 callbacks=[RecordValMap(str(rec))], final_eval=False)
    r0, r1 = (json.loads((rec / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["val_map"] == pytest.approx(r1["val_map"], abs=1e-9)
    assert r0["val_map"] == pytest.approx(r0["whole"], abs=1e-6)


# -- joining the process group, and the workers' errors ------------------------------------------


def test_rendezvous_failures_are_one_line_errors_naming_the_address(monkeypatch):
    import socket

    import torch

    from imgclf.engine import distributed

    threads = torch.get_num_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        try:
            with pytest.raises(imgclf.errors.UserError, match="MASTER_ADDR"):
                distributed.setup(torch.device("cpu"))
            monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
            with pytest.raises(imgclf.errors.UserError) as e:  # rank 0 cannot listen on a port in use
                distributed.setup(torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
    assert f"127.0.0.1:{port}" in str(e.value) and "\n" not in str(e.value)


def test_a_workers_missing_package_reaches_the_parent_as_such(monkeypatch, tmp_path):
    # the CLI's install hint needs the ModuleNotFoundError and its name, not a UserError of its text
    import os

    import imgclf.api
    from imgclf.engine import distributed

    def train(*a, **k):
        raise ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript")

    monkeypatch.setattr(imgclf.api, "train", train)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "IMGCLF_TRAIN_STARTED"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # _worker sets them: restored after the test
    call = {"config": None, "resume": None, "callbacks": None, "options": {}, "started": 0.0}
    with pytest.raises(SystemExit):
        distributed._worker(1, 2, 1, call, str(tmp_path))
    err = distributed._worker_error(json.loads((tmp_path / "error1.json").read_text()))
    assert type(err) is ModuleNotFoundError and err.name == "onnxscript"
    assert type(distributed._worker_error({"kind": "user", "message": "bad"})) is imgclf.errors.UserError

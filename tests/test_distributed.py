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
the weights after 2 epochs (22 steps) agree to ~1e-8 on AVX-512 CPUs and 7.7e-6 on an AVX2-only
one (other kernels, other summation orders); the test allows 5e-5 (TOLERANCE). A sharding or
reduction bug shows at ~1e-3 (the per-rank class-weight normalisation: 7.9e-3).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import imgclf
import imgclf.errors
from imgclf.engine.callbacks import Callback

TOLERANCE = 5e-5  # measured: ~1e-8 with AVX-512, 7.7e-6 AVX2-only (fp32 rounding, summation order)


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


@pytest.fixture(scope="module")
def imbalanced_sample(small_sample, tmp_path_factory) -> Path:
    """small_sample's training images, 40 down to 8 per class: balanced class weights far from 1."""
    import shutil

    out = tmp_path_factory.mktemp("imbalanced")
    for i, cdir in enumerate(sorted((small_sample / "train").iterdir())):
        dst = out / "train" / cdir.name
        dst.mkdir(parents=True)
        for f in sorted(cdir.glob("*.jpg"))[: 40 - 8 * (i % 5)]:
            shutil.copy(f, dst / f.name)
    return out


def test_class_weights_two_processes_match_one(imbalanced_sample, tmp_path):
    # the weighted loss is normalised by the global batch's weight sum: each rank's own sum
    # weighted its shard differently (measured max |w1 - w2| = 7.9e-3 before, 1.5e-8 after)
    opts = dict(class_weights="balanced", final_eval=False)
    one = imgclf.train(**_options(imbalanced_sample, tmp_path / "one", **opts))
    two = imgclf.train(**_options(imbalanced_sample, tmp_path / "two", devices=2, **opts))
    diff = _max_diff(_weights(one.run_dir), _weights(two.run_dir))
    assert diff < TOLERANCE, f"max |w1 - w2| = {diff:.3g}"
    for a, b in zip(one.history, two.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


class CrashAtStep(Callback):
    """Simulates a run killed within an epoch: fails at the end of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, t):
        if t.step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["epoch", "within"])
def test_distributed_resume(runs, small_sample, tmp_path, cut):
    """Killed at epoch 2's start (last.pt: epoch 1's end) or within epoch 2 (a checkpoint after
    each step, checkpoint_minutes): the resumed 2-process run ends where the uninterrupted one did."""
    _, two, _ = runs
    litter = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    # 360 images, global batch 32: 11 steps an epoch; within: the crash after step 17 leaves the
    # checkpoint of step 16 (epoch 2's fifth), the first at which the ranks ask whether one is due
    crash, extra = (Crash(2), {}) if cut == "epoch" else (CrashAtStep(17), {"checkpoint_minutes": 1e-9})
    with pytest.raises(Exception, match="simulated crash"):
        imgclf.train(**_options(small_sample, tmp_path, devices=2, name="crashed", **extra), callbacks=[crash])
    # the workers' tracebacks reached the parent and nothing was left in the temp folder
    assert set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*")) == litter
    run = tmp_path / "crashed"
    assert (run / "last.pt").exists() and not (run / "model.safetensors").exists()
    part = torch.load(run / "last.pt", weights_only=True).get("in_epoch")
    if cut == "within":
        assert (part["epoch"], part["batch"], part["world"]) == (1, 5, 2)
        ranks = part["ranks"]  # each rank's own generators and running sums, not rank 0's twice
        assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])
        assert ranks[0]["seen"] == ranks[1]["seen"] == 5 * 16 and ranks[0]["loss_sum"] != ranks[1]["loss_sum"]
    else:
        assert part is None
    res = imgclf.train(resume=run, progress=False)
    assert res.run_dir == run and len(res.history) == 2
    diff = _max_diff(_weights(two.run_dir), _weights(run))
    assert diff < TOLERANCE, f"max |w_resumed - w_uninterrupted| = {diff:.3g}"
    for a, b in zip(two.history, res.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_global_batch_must_divide(small_sample, tmp_path):
    with pytest.raises(imgclf.errors.UserError, match="global batch"):
        imgclf.train(**{**_options(small_sample, tmp_path, devices=2), "batch_size": 33})


@pytest.mark.slow
def test_time_limit_two_processes_plan_one_length(small_sample, tmp_path):
    # both ranks must step the same number of times (a rank that stopped early would hang the
    # other in its next all-reduce); the budget counts from this call, process start-up included
    import time

    budget = 20.0
    t0 = time.perf_counter()
    res = imgclf.train(**{**_options(small_sample, tmp_path, devices=2), "epochs": None, "time_limit": budget})
    assert time.perf_counter() - t0 <= budget + 3.0
    assert res.config.time_limit == budget and len(res.history) == np.ceil(res.config.epochs) >= 2
    assert (res.run_dir / "model.safetensors").exists() and res.test["n"] == 100


def test_head_only_phase_in_two_processes(small_sample, tmp_path):
    # DDP registers the backbone's parameters as trained; FreezeBackbone then freezes them for
    # the first epoch, so their gradients never arrive: DDP must be told to expect that, or the
    # second step fails ("Expected to have finished reduction in the prior iteration")
    res = imgclf.train(data=str(small_sample), model="timm:test_resnet", head=[32], freeze_epochs=1, epochs=2,
                       batch_size=32, image_size=32, precision="fp32", tta=False, tensorboard=False,
                       progress=False, project=str(tmp_path), devices=2, device="cpu")
    assert len(res.history) == 2 and res.test["n"] == 100


# -- multi-label validation: mAP over the whole val split on every rank --------------------------


def _gather_worker(rank: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from imgclf.engine.distributed import gather_rows

    dist.init_process_group("gloo", init_method=Path(out, "store").as_uri(), rank=rank, world_size=2)
    try:
        rows = torch.arange(3 - rank, dtype=torch.float32).view(-1, 1).repeat(1, 4) + 10 * rank  # 3 rows, then 2
        got = gather_rows(rows, torch.device("cpu"))
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_joins_unequal_shards_in_rank_order(tmp_path):
    import torch
    import torch.multiprocessing as tmp

    tmp.start_processes(_gather_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    expected = torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4, [10.0] * 4, [11.0] * 4])
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


class RecordVal(Callback):
    """Writes each rank's validation scores and BatchNorm statistics, and on rank 0 the scores of
    its model (the one saved) on the whole val split."""

    def __init__(self, out: str):
        self.out = out

    def on_epoch_end(self, t, row):
        import torch
        import torch.nn.functional as F

        from imgclf.data.loader import BatchLoader
        from imgclf.evaluate.inference import logits_for_loader
        from imgclf.evaluate.multilabel_metrics import mean_average_precision

        rank = t.train_loader.rank
        rec = {k: row[k] for k in ("val_loss", "val_acc", "val_map")}
        rec["buffers"] = [b.double().sum().item() for n, b in t.eval_model().named_buffers() if "running" in n]
        if rank == 0:
            whole = BatchLoader(t.val_loader.data, 64, t.device, shuffle=False)
            logits, labels = logits_for_loader(t.eval_model(), whole, t.normalize, t.precision, t.device)
            rec["whole_map"] = mean_average_precision(torch.sigmoid(logits).numpy(), labels.numpy())
            rec["whole_loss"] = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(1).mean().item()
        Path(self.out, f"rank{rank}.json").write_text(json.dumps(rec))


def test_validation_scores_rank0s_model_on_the_whole_val_split(small_sample, tmp_path):
    # val_map is the multi-label monitor (early stopping, plateau, best checkpoint): a rank
    # scoring only its own shard took its own decisions, and the ranks hung or drifted apart.
    # With BatchNorm each rank's last steps update its own running statistics: validation first
    # takes rank 0's, so the scores describe the model that is saved, not a mix of models
    rec = tmp_path / "rec"
    rec.mkdir()
    model_args = {"channels": [8, 16], "dense": [], "dropout": 0.0, "batchnorm": True}
    imgclf.train(**{**_options(small_sample, tmp_path / "runs", devices=2), "epochs": 1, "task": "multilabel",
                    "model_args": model_args}, callbacks=[RecordVal(str(rec))], final_eval=False)
    r0, r1 = (json.loads((rec / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["buffers"] and r0["buffers"] == r1["buffers"]
    assert r0["val_map"] == pytest.approx(r1["val_map"], abs=1e-9)
    assert r0["val_map"] == pytest.approx(r0["whole_map"], abs=1e-6)
    assert r0["val_loss"] == pytest.approx(r0["whole_loss"], abs=1e-6)


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
              "IMGCLF_TRAIN_STARTED", "IMGCLF_DDP_OUT"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # _worker sets them: restored after the test
    call = {"config": None, "resume": None, "callbacks": None, "options": {}, "started": 0.0}
    with pytest.raises(SystemExit):
        distributed._worker(1, 2, call, str(tmp_path))
    err = distributed._worker_error(json.loads((tmp_path / "error1.json").read_text()))
    assert type(err) is ModuleNotFoundError and err.name == "onnxscript"
    assert type(distributed._worker_error({"kind": "user", "message": "bad"})) is imgclf.errors.UserError


def _setup_worker(rank: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from imgclf.engine import distributed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", distributed._OUT_ENV: out})
    distributed.setup(torch.device("cpu"))
    try:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        Path(out, f"sum{rank}").write_text(str(t.item()))
    finally:
        dist.destroy_process_group()


def test_spawned_processes_meet_without_a_port(tmp_path, monkeypatch):
    """--devices N processes join through a file in the parent's temp folder: a port picked for
    them could be taken by another program first. Here MASTER_ADDR:PORT names a port in use."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        tmp.start_processes(_setup_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    assert [Path(tmp_path, f"sum{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]


# -- the parent: what it refuses before starting processes, and stopping or losing them ----------


def test_refused_in_the_parent_before_any_process_starts(small_sample, tmp_path, monkeypatch):
    import torch.multiprocessing

    def no_spawn(*a, **k):
        raise AssertionError("processes were started")

    monkeypatch.setattr(torch.multiprocessing, "start_processes", no_spawn)
    with pytest.raises(imgclf.errors.UserError, match="global batch"):
        imgclf.train(**{**_options(small_sample, tmp_path, devices=2), "batch_size": 33})
    with pytest.raises(imgclf.errors.UserError, match="--lr auto"):
        imgclf.train(**_options(small_sample, tmp_path, devices=2, lr="auto"))

    class Local(Callback):  # a local class: the processes could not unpickle it
        pass

    with pytest.raises(imgclf.errors.UserError, match="callbacks") as e:
        imgclf.train(**_options(small_sample, tmp_path, devices=2), callbacks=[Local()])
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # no run folder either


def test_a_gpu_index_with_devices_is_refused_not_ignored(monkeypatch):
    # process k takes cuda:k: '--device cuda:2 --devices 2' trained on cuda:0 and cuda:1
    import torch

    from imgclf.engine import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(imgclf.errors.UserError, match=r"--device cuda:2 --devices 2: .*CUDA_VISIBLE_DEVICES=2,3"):
        distributed.spawn_train(2, torch.device("cuda:2"), config=None, resume=None, callbacks=None, options={})


def test_automatic_batch_divides_by_the_processes():
    # --devices 3 failed with "--batch-size 32 ... must divide by the 3 processes", an option never given
    from imgclf.config import make_config
    from imgclf.engine import recipe

    for world, n_train, expected in ((1, 5000, 128), (3, 5000, 129), (3, 256, 33), (5, 100, 15), (6, 5000, 126)):
        cfg = recipe.resolve(make_config(None, data="d"), n_train=n_train, image_size=32, arch="plaincnn", world=world)
        assert cfg.batch_size == expected, (world, n_train)
    given = recipe.resolve(make_config(None, data="d", batch_size=32), n_train=5000, image_size=32, arch="plaincnn",
                           world=3)
    assert given.batch_size == 32  # an explicit batch is the user's: refused, not changed


def test_process_exit_messages():
    from imgclf.engine.distributed import exit_message

    assert exit_message(1, -9).startswith("process 1 was killed by SIGKILL (out of memory?")
    assert exit_message(0, -11) == "process 0 was killed by SIGSEGV"
    assert exit_message(0, 143) == "process 0 was stopped by SIGTERM"
    assert exit_message(1, 3) == "process 1 exited with code 3"


def _end(code: int, out: str, done: bool) -> None:
    import os

    if done:  # what DistContext.close leaves once every rank has met at the last barrier
        Path(out, f"done{os.environ['RANK']}").touch()
    if code < 0:
        import faulthandler

        faulthandler.disable()  # pytest's: no stack dump for an abort the test asks for
        os.abort()  # SIGABRT, as a C++ std::terminate in the teardown ends a process
    os._exit(code)


def test_a_process_that_dies_after_the_last_barrier_fails_nothing(tmp_path):
    # gloo's teardown aborted a finished process now and then ("terminate called without an
    # active exception"): the parent failed a run whose every rank had finished and whose
    # result was written. Dying after the last barrier is said, not a failure; dying before it is.
    import multiprocessing as mp
    import os

    from imgclf.engine.distributed import _wait_for_failure

    def start(*plan):
        for f in tmp_path.iterdir():
            f.unlink()
        procs = []
        for rank, (code, done) in enumerate(plan):
            os.environ["RANK"] = str(rank)
            p = mp.get_context("fork").Process(target=_end, args=(code, str(tmp_path), done))
            p.start()
            procs.append(p)
        del os.environ["RANK"]
        return procs

    assert _wait_for_failure(start((0, True), (-1, True)), str(tmp_path)) is None
    procs = start((0, True), (-1, False))
    assert _wait_for_failure(procs, str(tmp_path)) == 1 and procs[1].exitcode == -6
    assert _wait_for_failure(start((3, False), (0, False)), str(tmp_path)) == 0


class KillRank(Callback):
    """SIGKILLs the process of ``rank`` as training starts (what the OOM killer does)."""

    def __init__(self, rank: int):
        self.rank = rank

    def on_train_start(self, t):
        import os
        import signal

        if t.train_loader.rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_process_is_one_line_and_leaves_no_new_run_folder(small_sample, tmp_path):
    # a new run folder without last.pt blocked running the same command again
    with pytest.raises(imgclf.errors.UserError) as e:
        imgclf.train(**_options(small_sample, tmp_path, devices=2, name="killed"), callbacks=[KillRank(1)],
                     final_eval=False)
    assert str(e.value).startswith("process 1 was killed by SIGKILL") and "\n" not in str(e.value)
    assert not (tmp_path / "killed").exists()


def _cli_train(small_sample, project: Path, name: str):
    """`imgclf train --devices 2` in its own session (signals to it reach no one else), long enough
    to be stopped while it trains."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "imgclf", "train", "--data", str(small_sample), "--devices", "2", "--device", "cpu",
           "--model", "plaincnn", "--image-size", "32", "--epochs", "500", "--batch-size", "32", "--precision", "fp32",
           "--optimizer", "sgd", "--no-tta", "--no-tensorboard", "--no-progress", "--project", str(project),
           "--name", name]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _workers_once(proc, marker: Path) -> list[int]:
    """The spawned processes of ``proc``, once ``marker`` exists."""
    import time

    deadline = time.monotonic() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"no {marker} in 90 s"
        time.sleep(0.1)
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid \
                    and b"spawn_main" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            pass
    assert len(found) == 2, found
    return found


def _kill_leftovers(proc, workers: list[int]) -> None:
    import os
    import signal

    proc.kill()
    proc.wait()
    for w in workers:
        if _alive(w):
            os.kill(w, signal.SIGKILL)


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
def test_killing_the_parent_ends_the_processes(small_sample, tmp_path):
    # kill -9 of `imgclf train --devices 2` left its processes running (re-parented to init): they
    # finished the run and wrote to its folder
    import time

    proc = _cli_train(small_sample, tmp_path, "k9")
    workers = []
    try:
        workers = _workers_once(proc, tmp_path / "k9" / "config.yaml")  # rank 0 made the run folder
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "the processes outlived their parent"
    finally:
        _kill_leftovers(proc, workers)
    assert not (tmp_path / "k9" / "model.safetensors").exists()


@linux_only
def test_ctrl_c_stops_every_process_with_one_line(small_sample, tmp_path):
    # SIGINT to the parent alone printed 'interrupted' while training went on, then a traceback;
    # the processes are now stopped and joined, the run resumable, and no traceback printed
    import signal

    proc = _cli_train(small_sample, tmp_path, "int")
    workers = []
    try:
        workers = _workers_once(proc, tmp_path / "int" / "last.pt")  # the first checkpoint
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        _kill_leftovers(proc, workers)
    assert proc.returncode == 130, err
    assert not [w for w in workers if _alive(w)]
    assert "Traceback" not in err and "Terminating process" not in err, err
    assert f"stopped: continue with 'imgclf train --resume {tmp_path / 'int'}'" in err
    assert (tmp_path / "int" / "last.pt").exists()

"""Data-parallel training: PyTorch's DistributedDataParallel, launched by torchrun or by imgclf.

Two ways in, one code path:

- ``torchrun ... -m imgclf train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
  :func:`setup` joins the process group they describe.
- ``imgclf train --devices N`` has :func:`spawn_train` start N processes on this machine with
  RANK and WORLD_SIZE set; they meet in a file store in the parent's temp folder (no port to
  pick) and otherwise take the torchrun path.

gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK). The rules a run follows are in
docs/distributed.md: ``batch_size`` is the global batch, rank 0 builds the cache and writes
everything, metrics are summed across ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from imgclf import log
from imgclf.errors import UserError

_ENV = ("RANK", "WORLD_SIZE")
_OUT_ENV = "IMGCLF_DDP_OUT"  # set in the processes spawn_train starts: the parent's temp folder


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    owns_group: bool  # this module initialised the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (Trainer.reduce): metrics of the whole data, not a shard."""
        t = t.to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` in rank order, on every rank (Trainer.validate's mAP)."""
        return gather_rows(t, self.device)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_str(self, s: str | None) -> str:
        """Rank 0's string on every rank (a run folder path). Bytes in a tensor: no pickling."""
        data = torch.tensor(list((s or "").encode()), dtype=torch.uint8, device=self.device)
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, 0)
        buf = data if self.is_main else torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        if int(n.item()):
            dist.broadcast(buf, 0)
        return bytes(buf.cpu().tolist()).decode()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            # Every rank waits here until rank 0 has finished its post-training work: a rank
            # tearing its group down while another still holds it aborted the process now and
            # then ("terminate called without an active exception").
            self.barrier()
            # past the barrier every rank has finished: a process of spawn_train that dies from here
            # on (in the teardown) has lost nothing, and its parent knows it by this file
            out = os.environ.get(_OUT_ENV)
            if out and Path(out).is_dir():
                Path(out, f"done{self.rank}").touch()
            dist.destroy_process_group()


def gather_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The rows (dim 0) of ``t`` from every rank of the process group, concatenated in rank
    order and returned on every rank, on ``t``'s device. Shards may differ in length (validation
    shards differ by up to one image): each is padded to the longest for all_gather, then cut."""
    world = dist.get_world_size()
    x = t.to(device).contiguous()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    lengths = [int(v.item()) for v in sizes]
    longest = max(lengths)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat([p[:k] for p, k in zip(parts, lengths)]).to(t.device)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics, an EMA copy's) into ``module`` on every
    rank, one broadcast per dtype. DDP sends them before each training forward pass, but each
    rank's last steps update its own copy (and an EMA model is not DDP's): validation scores each
    shard with rank 0's model, the one saved, only after this."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault((b.dtype, b.device), []).append(b)
    for bufs in groups.values():
        flat = _flatten_dense_tensors(bufs)
        dist.broadcast(flat, 0)
        for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            b.copy_(v)


def launched() -> bool:
    """True inside a process started by torchrun (or by spawn_train)."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup(device: torch.device) -> DistContext | None:
    """Join the process group described by the environment; None when not distributed."""
    if not launched():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {rank} wants cuda:{local_rank} but this node has {torch.cuda.device_count()} "
                            "GPUs: start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
        # N processes sharing the cores: more threads than cores makes every process slower.
        torch.set_num_threads(max(1, cpu_cores() // local_world))
    else:
        raise UserError(f"distributed training runs on CPU (gloo) or CUDA (NCCL), not on {device.type}")
    owns = not dist.is_initialized()
    if owns and spawned():
        # spawn_train's processes meet in a file in the parent's temp folder: a port picked by the
        # parent could be taken by another program before rank 0 listened on it
        store = Path(os.environ[_OUT_ENV], "store")
        try:
            dist.init_process_group(backend, init_method=store.as_uri(), rank=rank, world_size=world,
                                    timeout=datetime.timedelta(hours=2))
        except (RuntimeError, ValueError) as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise UserError(f"process {rank} of {world} could not join the process group ({backend}, {store}): "
                            f"{first}") from None
    elif owns:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        where = f"{addr or '(MASTER_ADDR not set)'}:{port or '(MASTER_PORT not set)'}"
        if not addr or not port:
            raise UserError(f"process {rank} of {world} cannot join the process group at {where}: set MASTER_ADDR and "
                            "MASTER_PORT (torchrun sets them), or start the processes with --devices N")
        try:
            # a generous timeout: rank 0 may spend a long time decoding the cache while others wait
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
        except (RuntimeError, ValueError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise UserError(f"process {rank} of {world} could not join the process group at {where} ({backend}): "
                            f"{first} (another process may hold the port, or the address is unreachable: "
                            "try another MASTER_PORT)") from None
    return DistContext(rank, world, local_rank, local_world, device, owns)


def main_first_begin(ctx: DistContext | None) -> None:
    """Start of work rank 0 does first (building the cache): the other ranks wait here."""
    if ctx is not None and not ctx.is_main:
        ctx.barrier()


def main_first_end(ctx: DistContext | None) -> None:
    """End of it: rank 0 releases the others, who then find the cache built and open it."""
    if ctx is not None and ctx.is_main:
        ctx.barrier()


def convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm layers -> SyncBatchNorm, in place. timm's converter, because timm's nets fuse the
    activation into BatchNormAct2d, which torch's converter turns into a plain SyncBatchNorm that
    drops the activation (EfficientNet, MobileNet: every ReLU6/SiLU gone in training). Frozen
    stages (--freeze-stages) are then re-resolved, so they keep the live layers in eval mode."""
    try:
        from timm.layers import convert_sync_batchnorm
    except ImportError:  # a net without timm layers
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    model = convert_sync_batchnorm(model)
    refresh = getattr(model, "refresh_frozen_stages", None)
    if callable(refresh):
        refresh()
    return model


def wrap(model: torch.nn.Module, ctx: DistContext, sync_bn: bool, frozen_phase: bool = False) -> torch.nn.Module:
    """The DDP wrapper used for the forward pass; it averages gradients across ranks.
    ``frozen_phase``: the backbone is frozen for the first steps (--freeze-epochs), after DDP
    has registered its parameters as trained."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        model = convert_sync_bn(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Models that freeze parameters between epochs (fastnet's stem bias) leave them without a
    # gradient later on, which DDP only tolerates when told to look for unused parameters.
    # The same holds for a backbone frozen after wrapping (FreezeBackbone, head-only phase).
    unused = frozen_phase or callable(getattr(model, "on_epoch_start", None))
    return DDP(model, device_ids=ids, find_unused_parameters=unused)


# ---------------------------------------------------------------------------------------------
# imgclf train --devices N


def spawned() -> bool:
    """This process is one that spawn_train started."""
    return bool(os.environ.get(_OUT_ENV))


def announce_run_dir(ctx: DistContext | None, run_dir: Path) -> None:
    """Rank 0 of a run started by spawn_train tells the parent its run folder, so the parent can
    say where to --resume, or remove a new folder without a checkpoint, when the run is stopped
    or a process dies."""
    out = os.environ.get(_OUT_ENV)
    if ctx is not None and ctx.is_main and out and Path(out).is_dir():
        _write_atomic(Path(out, "run_dir.txt"), str(run_dir))


def hand_back(ctx: DistContext | None, result) -> None:
    """Rank 0 of a run started by spawn_train gives the parent its TrainResult, before the
    process group is torn down (a process that dies in the teardown has then lost nothing)."""
    out = os.environ.get(_OUT_ENV)
    if ctx is not None and ctx.is_main and out and Path(out).is_dir():
        _write_atomic(Path(out, "result.json"), json.dumps({"run_dir": str(result.run_dir), "history": result.history,
                                                            "test": result.test}, default=str))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Stopped(BaseException):
    """Raised in a spawned process by SIGINT/SIGTERM (the parent stopping the run, a Ctrl-C sent to
    the whole process group, the parent's death). It unwinds through train(): checkpoint writes
    drop their temp files and rank 0 removes a new run folder without a checkpoint; the parent,
    not the processes, tells the user."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_GRACE_S = 10.0  # how long a stopped process may take to unwind before it is killed


def _ignore_stop_signals() -> None:
    # a handler that does nothing, not SIG_IGN: a signal already caught but not yet handled then
    # finds no Python handler, and Python prints "Signal 15 ignored due to race condition"
    for s in _STOP_SIGNALS:
        signal.signal(s, _swallow)


def _swallow(signum, frame) -> None:
    pass


def _on_stop_signal(signum, frame) -> None:
    _ignore_stop_signals()  # once: a second signal must not interrupt the unwinding
    raise _Stopped(signum)


def _die_with_parent(parent: int) -> None:
    """A spawned process ends when the process that started it does (kill -9, a crash): left
    running it would finish the run and write to its folder. SIGTERM at the parent's death
    replaces torch's SIGINT (which a shell ignores in background jobs); a process stuck in
    native code exits after a grace period."""
    from imgclf.procs import end_with_parent

    end_with_parent(parent, poll_s=0.5, grace_s=_GRACE_S)


def _worker(local_rank: int, world: int, call: dict[str, Any], out: str, parent: int | None = None) -> None:
    """One process of spawn_train (``parent``: its pid)."""
    if parent is not None:
        for s in _STOP_SIGNALS:
            signal.signal(s, _on_stop_signal)
        _die_with_parent(parent)
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world),
                       # --time-limit counts from the parent's train() call, process start-up included
                       "IMGCLF_TRAIN_STARTED": str(call["started"]), _OUT_ENV: out})
    if "cpu_bf16" in call:  # --precision auto: the parent's answer (engine.cpu_bf16)
        from imgclf.engine.cpu_bf16 import ENV

        os.environ[ENV] = "1" if call["cpu_bf16"] else "0"
    from imgclf.api import train

    try:
        train(call["config"], resume=call["resume"], callbacks=call["callbacks"], **call["options"])
        # The run is complete and written, and the process group is torn down: end without the
        # interpreter's teardown. Its C++ destructors (gloo's threads still joinable at exit)
        # aborted a finished process now and then, "terminate called without an active exception"
        # and SIGABRT, which failed a run that had succeeded.
        if parent is not None:
            _exit_now(0)
    except _Stopped as e:
        raise SystemExit(128 + e.signum) from None  # quietly: the parent says what happened
    except (UserError, ModuleNotFoundError) as e:
        if parent is not None:
            _ignore_stop_signals()  # the error file is written whole
        # the parent raises it again (a one-line error; a missing optional package keeps its name,
        # so the CLI's install hint names it); a non-zero exit stops the other ranks
        kind = "module" if isinstance(e, ModuleNotFoundError) else "user"
        _write_atomic(Path(out, f"error{local_rank}.json"), json.dumps({"kind": kind, "message": str(e),
                                                                        "name": getattr(e, "name", None)}))
        raise SystemExit(2) from None


def _exit_now(code: int) -> None:
    """os._exit after flushing what Python would have flushed at exit (the streams, the logs)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced by a caller
            pass
    os._exit(code)


def _worker_error(e: dict) -> Exception:
    """A worker's error file back as the exception the worker raised (UserError or ModuleNotFoundError)."""
    if e.get("kind") == "module":
        return ModuleNotFoundError(e["message"], name=e.get("name"))
    return UserError(e["message"])


def _exit_error(index: int, exitcode: int | None, out: str, error_file: str | None) -> Exception:
    """Why process ``index`` failed, as the exception the parent raises: the worker's own error
    (UserError, missing package), the traceback of an exception it raised (torch's
    ProcessRaisedException, as torch.multiprocessing reports it), or one line for a process
    ended by a signal or an exit code."""
    import pickle

    import torch.multiprocessing as tmp

    ours = Path(out, f"error{index}.json")
    if ours.is_file():
        return _worker_error(json.loads(ours.read_text()))
    if error_file and os.path.isfile(error_file) and os.path.getsize(error_file):
        with open(error_file, "rb") as f:
            trace = pickle.load(f)
        return tmp.ProcessRaisedException(f"\n\n-- Process {index:d} terminated with the following error:\n{trace}",
                                          index, 0)
    return UserError(exit_message(index, exitcode))


def exit_message(index: int, exitcode: int | None) -> str:
    """One line for a process that ended without an error of its own (a signal, an exit code)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends it: see dmesg)" if name == "SIGKILL" else ""
        return f"process {index} was killed by {name}{hint}"
    if exitcode is not None and exitcode - 128 in {int(s) for s in _STOP_SIGNALS}:
        return f"process {index} was stopped by {signal.Signals(exitcode - 128).name}"
    return f"process {index} exited with code {exitcode}"


def _failure(procs, first: int, ended: list[int], out: str, error_files: list[str]) -> Exception:
    """The exception that says why the run failed. A failing process brings the others down (a
    collective on a closed connection fails, stop_all's SIGTERM), so the cause is, first, a
    user error any rank wrote; then a process killed by a signal before the others were stopped
    (the OOM killer); then the first process seen failing."""
    mine = [i for i in range(len(procs)) if Path(out, f"error{i}.json").is_file()]
    if mine:
        return _exit_error(mine[0], procs[mine[0]].exitcode, out, None)
    killed = [i for i in ended if (procs[i].exitcode or 0) < 0]
    i = killed[0] if killed else first
    return _exit_error(i, procs[i].exitcode, out, error_files[i])


def _wait_for_failure(procs, out: str | None = None) -> int | None:
    """Wait until every process has ended (None) or one has failed (its index). A process that
    ends badly after it passed the last barrier (its ``done`` file in ``out``: DistContext.close)
    failed in the teardown only, every rank having finished: that is said, and is no failure."""
    from multiprocessing.connection import wait

    pending = {p.sentinel: i for i, p in enumerate(procs)}
    while pending:
        for sentinel in wait(list(pending)):
            i = pending.pop(sentinel)
            procs[i].join()
            if procs[i].exitcode == 0:
                continue
            if out is not None and Path(out, f"done{i}").is_file():
                log.info(f"{exit_message(i, procs[i].exitcode)} after the run had finished, while closing: "
                         "nothing was lost")
                continue
            return i
    return None


def _stop_all(procs, grace: float = _GRACE_S) -> None:
    """SIGTERM to every live process (each unwinds: _Stopped), a grace period, then SIGKILL; all
    joined before returning. A second Ctrl-C cuts the wait short."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace
    try:
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _check_callbacks(callbacks, n: int) -> None:
    """Callbacks are pickled into each spawned process: say now, in one line, when they cannot be."""
    if not callbacks:
        return
    from multiprocessing.reduction import ForkingPickler

    why = None
    try:
        ForkingPickler.dumps(list(callbacks))
    except Exception as e:  # noqa: BLE001 - PicklingError, AttributeError, TypeError: all mean the same
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    main = sys.modules.get("__main__")
    if why is None and not getattr(main, "__file__", None):
        here = [type(c).__name__ for c in callbacks if type(c).__module__ == "__main__"]
        if here:  # pickled by name, but the processes cannot import an interactive session's __main__
            why = f"{', '.join(here)} is defined in an interactive session, which the processes cannot import"
    if why:
        raise UserError(f"--devices {n}: each process gets a copy of the callbacks, and these cannot be copied ({why}): "
                        "define callback classes at the top level of a module or script (no lambdas or local classes)")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def spawn_train(n: int, device: torch.device, *, config, resume, callbacks, options: dict[str, Any],
                started: float | None = None, cfg=None):
    """Run ``imgclf.train`` in ``n`` processes on this machine; returns rank 0's TrainResult.

    Ctrl-C or SIGTERM to this process stops the others (they unwind, and are killed after a grace
    period) before it raises KeyboardInterrupt; a process that fails stops the others. Either way
    a new run folder without a checkpoint is removed, as a 1-process run's is. Killing this
    process outright (SIGKILL) ends the others too (_die_with_parent)."""
    import torch.multiprocessing as tmp

    from imgclf.api import TrainResult
    from imgclf.config import make_config

    if device.type == "cuda" and n > torch.cuda.device_count():
        raise UserError(f"--devices {n} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                        f"--device cpu --devices {n} runs {n} CPU processes instead")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--devices N runs on CPU or CUDA, not on {device.type}")
    if device.type == "cuda" and device.index not in (None, 0):  # process k takes cuda:k, whatever was named
        raise UserError(f"--device {device} --devices {n}: the processes take cuda:0..{n - 1}; choose the GPUs with "
                        f"CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES={device.index},{device.index + 1}) and "
                        "--device cuda")
    batch = cfg.batch_size if cfg is not None else options.get("batch_size")
    if isinstance(batch, int) and batch % n:  # say so before starting n processes
        raise UserError(f"--batch-size {batch} is the global batch and must divide by the {n} processes")
    if cfg is not None and cfg.lr == "auto":  # before decoding the data in n processes
        raise UserError(f"--lr auto runs the lr finder in one process, not {n}: run 'imgclf lr-find' first and "
                        "pass --lr VALUE")
    _check_callbacks(callbacks, n)
    call = {"config": str(config) if config is not None else None, "resume": str(resume) if resume else None,
            "callbacks": callbacks, "options": options, "started": started or time.time()}
    if device.type == "cpu":  # timed once here, not in n processes at once that could disagree
        # (Muon's Newton-Schulz dtype asks it under --precision fp32 too: optim.ns_dtype)
        from imgclf.engine.cpu_bf16 import bf16_pays

        call["cpu_bf16"] = bf16_pays()
    new = resume is None
    with tempfile.TemporaryDirectory(prefix="imgclf-ddp-") as out:
        # torch names a pytorch-errorfile-*.pickle per worker in the temp folder and leaves the
        # ones a failed worker wrote behind: make them here, in a folder that is removed (only
        # once every process has ended: a live one may still write there)
        saved, tempfile.tempdir = tempfile.tempdir, out
        handlers: dict = {}
        try:
            if _main_thread():
                # the processes start with SIGINT ignored (inherited), so a Ctrl-C while they
                # import torch reaches only this process; each sets its own handler in _worker
                handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                ctx = tmp.start_processes(_worker, args=(n, call, out, os.getpid()), nprocs=n,
                                          join=False, start_method="spawn")
            finally:
                if signal.SIGINT in handlers:
                    signal.signal(signal.SIGINT, handlers.pop(signal.SIGINT))
            if _main_thread():  # SIGTERM to this process stops the run as Ctrl-C does
                handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
            procs = ctx.processes
            try:
                failed = _wait_for_failure(procs, out)
            except KeyboardInterrupt as e:
                _stop_all(procs)
                _after_stop(_announced(out, resume), e, new=new)
                raise
            if failed is not None:
                ended = [i for i, p in enumerate(procs) if not p.is_alive()]  # before the others are stopped
                _stop_all(procs)
                err = _failure(procs, failed, ended, out, ctx.error_files)
                _after_stop(_announced(out, resume), err, new=new)
                raise err from None
        finally:
            tempfile.tempdir = saved
            if signal.SIGTERM in handlers:
                signal.signal(signal.SIGTERM, handlers.pop(signal.SIGTERM))
        if not Path(out, "result.json").is_file():  # every process ended well, yet rank 0 gave nothing back
            run = _announced(out, resume)
            raise UserError("the training processes ended without a result" + (f": see {run}" if run else ""))
        r = json.loads(Path(out, "result.json").read_text())
    run_dir = Path(r["run_dir"])
    return TrainResult(run_dir, r["history"], test=r["test"], config=make_config(run_dir / "config.yaml"))


def _announced(out: str, resume) -> Path | None:
    f = Path(out, "run_dir.txt")
    if f.is_file():
        return Path(f.read_text())
    return Path(resume) if resume else None


def _after_stop(run: Path | None, exc: BaseException, *, new: bool) -> None:
    """What a 1-process run does when training ends by an exception (api._stopped_early): after
    Ctrl-C say where to --resume; remove a new run folder without a checkpoint."""
    from imgclf.api import _stopped_early

    if run is not None and new and not run.exists() and isinstance(exc, KeyboardInterrupt):
        # rank 0 unwound and removed it already
        log.info(f"stopped before the first checkpoint: {run} removed (nothing to resume)")
        return
    _stopped_early(run, exc, new=new)

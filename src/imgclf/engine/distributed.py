"""Data-parallel training: PyTorch's DistributedDataParallel, launched by torchrun or by imgclf.

Two ways in, one code path:

- ``torchrun ... -m imgclf train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
  :func:`setup` joins the process group they describe.
- ``imgclf train --devices N`` has :func:`spawn_train` start N processes on this machine with
  those variables set (a free port on 127.0.0.1), so each of them takes the torchrun path.

gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK). The rules a run follows are in
docs/distributed.md: ``batch_size`` is the global batch, rank 0 builds the cache and writes
everything, metrics are summed across ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from imgclf.errors import UserError

_ENV = ("RANK", "WORLD_SIZE")


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
    if owns:
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world: int, port: int, call: dict[str, Any], out: str) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       # --time-limit counts from the parent's train() call, process start-up included
                       "IMGCLF_TRAIN_STARTED": str(call["started"])})
    from imgclf.api import train

    try:
        res = train(call["config"], resume=call["resume"], callbacks=call["callbacks"], **call["options"])
    except (UserError, ModuleNotFoundError) as e:
        # the parent raises it again (a one-line error; a missing optional package keeps its name,
        # so the CLI's install hint names it); a non-zero exit stops the other ranks
        kind = "module" if isinstance(e, ModuleNotFoundError) else "user"
        Path(out, f"error{local_rank}.json").write_text(json.dumps({"kind": kind, "message": str(e),
                                                                   "name": getattr(e, "name", None)}))
        raise SystemExit(2) from None
    if local_rank == 0:
        Path(out, "result.json").write_text(json.dumps({"run_dir": str(res.run_dir), "history": res.history,
                                                         "test": res.test}, default=str))


def _worker_error(e: dict) -> Exception:
    """A worker's error file back as the exception the worker raised (UserError or ModuleNotFoundError)."""
    if e.get("kind") == "module":
        return ModuleNotFoundError(e["message"], name=e.get("name"))
    return UserError(e["message"])


def spawn_train(n: int, device: torch.device, *, config, resume, callbacks, options: dict[str, Any],
                started: float | None = None):
    """Run ``imgclf.train`` in ``n`` processes on this machine; returns rank 0's TrainResult."""
    import torch.multiprocessing as tmp

    from imgclf.api import TrainResult
    from imgclf.config import make_config

    if device.type == "cuda" and n > torch.cuda.device_count():
        raise UserError(f"--devices {n} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                        f"--device cpu --devices {n} runs {n} CPU processes instead")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--devices N runs on CPU or CUDA, not on {device.type}")
    batch = options.get("batch_size")
    if isinstance(batch, int) and batch % n:  # say so before starting n processes
        raise UserError(f"--batch-size {batch} is the global batch and must divide by the {n} processes")
    call = {"config": str(config) if config is not None else None, "resume": str(resume) if resume else None,
            "callbacks": callbacks, "options": options, "started": started or time.time()}
    with tempfile.TemporaryDirectory(prefix="imgclf-ddp-") as out:
        # torch names a pytorch-errorfile-*.pickle per worker in the temp folder and leaves the
        # ones a failed worker wrote behind: make them here, in a folder that is removed
        saved, tempfile.tempdir = tempfile.tempdir, out
        try:
            tmp.start_processes(_worker, args=(n, free_port(), call, out), nprocs=n, join=True, start_method="spawn")
        except (tmp.ProcessExitedException, tmp.ProcessRaisedException):
            errors = sorted(Path(out).glob("error*.json"))
            if errors:
                raise _worker_error(json.loads(errors[0].read_text())) from None
            raise
        finally:
            tempfile.tempdir = saved
        r = json.loads(Path(out, "result.json").read_text())
    run_dir = Path(r["run_dir"])
    return TrainResult(run_dir, r["history"], test=r["test"], config=make_config(run_dir / "config.yaml"))

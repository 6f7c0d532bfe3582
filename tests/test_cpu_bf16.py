"""--precision auto on CPUs: bf16 where it is faster, decided once per machine."""

from __future__ import annotations

import json

import pytest
import torch

from imgclf.engine import cpu_bf16, optim
from imgclf.engine.trainer import resolve_precision


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """A CPU with AVX512-BF16 and no AMX, a fresh cache folder and no answer in memory."""
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_bf16, "_ANSWER", {})
    monkeypatch.setattr(optim, "_NS_DTYPE", {})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    return torch.device("cpu")


def _timed(monkeypatch, bf16_s: float, fp32_s: float) -> list[int]:
    calls = []

    def timings():
        calls.append(1)
        return bf16_s, fp32_s

    monkeypatch.setattr(cpu_bf16, "timings", timings)
    return calls


def test_flags_decide_without_timing_where_they_can(cpu, monkeypatch):
    calls = _timed(monkeypatch, 0.5, 1.0)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_precision("auto", cpu).dtype is None  # emulated bf16: fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", cpu).dtype == torch.bfloat16  # AMX tiles: bf16
    assert not calls


@pytest.mark.parametrize("bf16_s, expect", [(0.5, torch.bfloat16), (1.42, None), (0.9, None)])
def test_avx512_bf16_without_amx_is_timed(cpu, monkeypatch, bf16_s, expect):
    # 0.5: bf16 twice as fast (AMD Zen 4); 1.42: the probe's ratio on an Intel Xeon whose AMX is
    # masked, where FastNet trained 1.75x faster in fp32; 0.9: too close to give up fp32 for
    calls = _timed(monkeypatch, bf16_s, 1.0)
    assert resolve_precision("auto", cpu).dtype == expect
    assert optim.ns_dtype(cpu) == (expect or torch.float32)
    assert resolve_precision("fp32", cpu).dtype is None and resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert len(calls) == 1  # once per process


def test_the_answer_is_kept_per_machine_so_later_runs_choose_the_same(cpu, monkeypatch, tmp_path):
    _timed(monkeypatch, 0.5, 1.0)
    assert cpu_bf16.bf16_pays()
    stored = json.loads((tmp_path / "cache" / "cpu-bf16.json").read_text())
    assert stored[cpu_bf16.machine_key()] == {"bf16": True, "bf16_s": 0.5, "fp32_s": 1.0}
    # a later process on the same machine reads it, even when a new timing would now say otherwise
    monkeypatch.setattr(cpu_bf16, "_ANSWER", {})
    calls = _timed(monkeypatch, 2.0, 1.0)
    assert cpu_bf16.bf16_pays() and not calls
    # another torch build or thread count is another key: timed afresh, both kept
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert not cpu_bf16.bf16_pays() and calls
    assert len(json.loads((tmp_path / "cache" / "cpu-bf16.json").read_text())) == 2


def test_an_unwritable_or_corrupt_cache_only_means_timing_again(cpu, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("IMGCLF_CACHE", str(blocker))
    calls = _timed(monkeypatch, 0.5, 1.0)
    assert cpu_bf16.bf16_pays() and calls == [1]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cpu-bf16.json").write_text("{not json")
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_bf16, "_ANSWER", {})
    assert cpu_bf16.bf16_pays() and calls == [1, 1]
    # and the corrupt file was replaced by a good one
    assert json.loads((tmp_path / "cache" / "cpu-bf16.json").read_text())[cpu_bf16.machine_key()]["bf16"]


def test_the_probe_times_both_precisions_and_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    bf16_s, fp32_s = cpu_bf16.timings(reps=2)
    assert torch.equal(torch.rand(4), expected)
    assert 0 < bf16_s < 30 and 0 < fp32_s < 30


def test_the_probe_runs_when_first_asked_inside_no_grad_or_inference_mode(cpu):
    # Muon's first step asks for the Newton-Schulz dtype under no_grad; predict asks under
    # inference_mode
    with torch.no_grad():
        optim.ns_dtype(cpu)
    cpu_bf16._ANSWER.clear()
    with torch.inference_mode():
        resolve_precision("auto", cpu)
    assert cpu_bf16.machine_key() in cpu_bf16._ANSWER


def test_imgclf_cpu_bf16_gives_the_answer(cpu, monkeypatch):
    calls = _timed(monkeypatch, 0.5, 1.0)
    monkeypatch.setenv(cpu_bf16.ENV, "0")
    assert resolve_precision("auto", cpu).dtype is None
    monkeypatch.setenv(cpu_bf16.ENV, "1")
    assert resolve_precision("auto", cpu).dtype == torch.bfloat16
    assert not calls


def test_processes_of_a_cpu_run_take_the_parents_answer(cpu, monkeypatch, tmp_path):
    # --devices N: timed in the parent once; N processes timing at once on shared cores could
    # each get another answer, and train in different precisions
    import torch.multiprocessing

    import imgclf.api
    from imgclf.engine import distributed

    _timed(monkeypatch, 0.5, 1.0)
    calls = []

    class Spawned(Exception):
        pass

    def capture(fn, args, **kw):
        calls.append(args)
        raise Spawned

    monkeypatch.setattr(torch.multiprocessing, "start_processes", capture)
    with pytest.raises(Spawned):
        distributed.spawn_train(2, cpu, config=None, resume=None, callbacks=[], options={"data": "x"})
    call = calls[0][1]
    assert call["cpu_bf16"] is True
    # in the process, the answer is the environment's, whatever a probe there would say
    _timed(monkeypatch, 2.0, 1.0)
    monkeypatch.setattr(cpu_bf16, "_ANSWER", {})
    seen = []

    def train(*a, **k):
        seen.append(cpu_bf16.bf16_pays())
        raise imgclf.errors.UserError("stop here")

    monkeypatch.setattr(imgclf.api, "train", train)
    monkeypatch.delenv(cpu_bf16.ENV, raising=False)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "IMGCLF_TRAIN_STARTED", distributed._OUT_ENV, cpu_bf16.ENV):
        monkeypatch.setenv(k, "")  # restored after the test: _worker writes them
    with pytest.raises(SystemExit):
        distributed._worker(0, 2, call, str(tmp_path))
    assert seen == [True]

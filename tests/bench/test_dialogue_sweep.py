"""The sessions-per-GPU benchmark's one command (`bench/gpu/run.sh`), proved on CPU with the small checkpoint.

The same entry point a GPU machine runs, as a real process: two slot points with sessions leaving and
joining, then a slot count whose allocation the kernel refuses (`--max-memory-mib` sets RLIMIT_DATA on
cpu): the sweep records that point as out of memory, stops, and keeps the points measured before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import REPO_ROOT

RUN = REPO_ROOT / "bench" / "gpu" / "run.sh"
PERCENTILES = {"p50", "p99", "max", "mean"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "dialogue_gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env |= {
        "PYTHON": sys.executable,
        "WHEELHOUSE": str(tmp / "no-wheelhouse"),  # the interpreter's own packages, as in the suite
        "CHORUS_DIALOGUE_DEVICE": "cpu",  # the CPU proof, also on a machine with a GPU
        "CHORUS_BENCH_THREADS": "1",
    }
    # 100,000 slots would need about 50 GB of streaming state: refused within the 1 GiB allowed (with
    # 256 MiB, the memory --profile-ticks' profiler maps left oneDNN too little for the next point).
    # The point listed after it must not run: the sweep stops at the first out-of-memory.
    args = ["--size", "small", "--slots", "2,3,100000,4", "--ticks", "16", "--warmup-ticks", "2"]
    args += ["--session-s", "0.3", "--primer-tokens", "2", "--max-memory-mib", "1024", "--out", str(out)]
    args += ["--adapters", "0,1,4,8", "--adapter-rank", "128", "--adapter-ticks", "4"]  # issue 16's target
    args += ["--profile-ticks", "2"]
    done = subprocess.run(
        [str(RUN), *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return results


def test_every_measured_point_has_the_tick_its_split_and_its_memory(sweep: dict[str, Any]) -> None:
    measured = sweep["points"][:2]
    assert [p["slots"] for p in measured] == [2, 3]
    for point in measured:
        assert point["outcome"] == "measured" and point["ticks"] == 16
        assert set(point["tick_ms"]) == PERCENTILES
        assert point["tick_ms"]["p50"] <= point["tick_ms"]["p99"] <= point["tick_ms"]["max"]
        assert set(point["stages_ms"]) == {"encode", "lm", "decode", "other"}
        assert all(set(stage) == PERCENTILES for stage in point["stages_ms"].values())
        assert point["peak_memory_mib"] > 0 and isinstance(point["realtime"], bool)
        assert point["session_frames_per_s"] > 0


def test_each_point_profiles_its_ticks_after_the_measured_ones(sweep: dict[str, Any]) -> None:
    """Where the time goes inside a tick (on a GPU, the kernels of the LM step), per point."""
    for point in sweep["points"][:2]:
        profile = point["profile"]
        assert profile["ticks"] == 2 and profile["time"] == "cpu" and profile["ms_per_tick"] > 0
        top = profile["top"]
        assert 0 < len(top) <= 15 and all(e["ms_per_tick"] > 0 and e["calls_per_tick"] > 0 for e in top)
        assert [e["ms_per_tick"] for e in top] == sorted((e["ms_per_tick"] for e in top), reverse=True)
        assert sum(e["share"] for e in top) <= 1.001
    assert point["ticks"] == 16  # the profiled ticks are not among the measured ones


def test_sessions_leave_and_join_during_the_measured_ticks(sweep: dict[str, Any]) -> None:
    for point in sweep["points"][:2]:
        assert point["join_ticks"] >= 1, "0.3 s sessions over 16 ticks: several end and are replaced"
        assert point["sessions_started"] > point["slots"]
        assert set(point["join_tick_ms"]) == PERCENTILES


def test_the_sweep_stops_at_the_first_out_of_memory_and_keeps_what_it_measured(sweep: dict[str, Any]) -> None:
    assert [p["slots"] for p in sweep["points"]] == [2, 3, 100000], "4 slots, listed after, never ran"
    refused = sweep["points"][-1]
    assert refused["outcome"] == "out_of_memory" and "allocate" in refused["error"]
    assert sweep["stopped_by"] == "out of memory at 100000 slots" and sweep["finished"]
    assert sweep["realtime_sessions"] in {0, 2, 3}


def test_the_baseline_and_the_configuration_are_in_the_same_results(sweep: dict[str, Any]) -> None:
    baseline = sweep["baseline_batch1"]
    assert baseline["ticks"] == 16 and set(baseline["tick_ms"]) == PERCENTILES
    assert set(baseline["stages_ms"]) == {"encode", "lm", "decode", "other"}
    configuration = sweep["configuration"]
    assert configuration["size"] == "small" and configuration["ticks_per_point"] == 16
    assert configuration["torch_compile"] is False, "the worker's rule on cpu: compile off"
    assert configuration["cuda_graphs"] is False and configuration["int8"] is False
    assert sweep["machine"]["device"] == "cpu"


def test_distinct_adapters_in_one_batch_are_measured_against_no_lora_in_the_same_run(
    sweep: dict[str, Any],
) -> None:
    """`--adapters 0,1,4,8 --adapter-rank 128`: the worker's per-row LoRA layers, the batch's rows over
    that many distinct random adapters, each variant's tick against the same batch with no LoRA."""
    adapters = sweep["adapters"]
    assert adapters["outcome"] == "measured", adapters
    assert (adapters["batch"], adapters["rank"], adapters["ticks_per_variant"]) == (8, 128, 4)
    variants = adapters["variants"]
    assert list(variants) == ["no_lora", "adapters_0", "adapters_1", "adapters_4", "adapters_8"]
    for variant in variants.values():
        assert set(variant["tick_ms"]) == PERCENTILES and variant["vs_no_lora"] > 0
    assert variants["no_lora"]["vs_no_lora"] == 1.0
    assert adapters["bank_slot_mib"] > 0 and adapters["adapter_load_ms_median"] > 0
    assert adapters["linear_layers"] > 0 and adapters["peak_memory_mib"] > 0
    kernels = adapters["kernels"]  # per LoRA kernel, so one device run says which to use
    assert list(kernels) == ["per_adapter", "grouped", "grouped_graphs"]
    for kernel in kernels.values():
        assert list(kernel) == ["adapters_0", "adapters_1", "adapters_4", "adapters_8"]
        assert all(set(v["tick_ms"]) == PERCENTILES and v["vs_no_lora"] > 0 for v in kernel.values())
    assert kernels["per_adapter"] == {name: v for name, v in variants.items() if name != "no_lora"}


def test_results_go_to_out_when_the_device_tool_sets_it(tmp_path: Path) -> None:
    from bench.gpu_sessions import parse

    os.environ["OUT"] = str(tmp_path)
    try:
        assert parse([]).out == tmp_path / "dialogue_gpu.json"
    finally:
        del os.environ["OUT"]


@pytest.mark.parametrize(
    "argv",
    [["--adapters", "x"], ["--adapters", "1,-4"], ["--slots", "8,many"], ["--lora-kernels", "grouped,fused"]],
)
def test_lists_that_do_not_parse_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.gpu_sessions import parse

    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    assert f"argument {argv[0]}: " in capsys.readouterr().err


def test_the_sweep_makes_the_lm_lean_and_measures_its_logits_against_the_float_one(tmp_path: Path) -> None:
    """`--weights int8 --kv-cache int8`: the float LM's logits first, then the lean LM swept (in-process)."""
    from bench.gpu_sessions import parse, run

    args = ["--size", "small", "--slots", "2", "--ticks", "4", "--warmup-ticks", "1", "--primer-tokens", "2"]
    args += ["--weights", "int8", "--kv-cache", "int8", "--out", str(tmp_path / "dialogue_gpu.json")]
    results = run(parse(args))
    configuration = results["configuration"]
    assert configuration["int8"] and configuration["weights"] == configuration["kv_cache"] == "int8"
    logits = results["int8_logits"]
    assert 0 < logits["l2_relative"] < 0.05 and logits["text_token_agreement"] >= 0.85, logits
    assert [p["outcome"] for p in results["points"]] == ["measured"] and results["finished"]


def test_the_sweep_imports_nothing_the_wheelhouse_does_not_bring() -> None:
    """The GPU machine has torch and what bench/gpu/wheelhouse.sh downloads; the services' own packages
    (PyAV for the gateway's Opus, FastAPI, onnxruntime, redis) are on neither: the sweep needs none."""
    probe = "import sys, bench.gpu_sessions; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert set(done.stdout.split()) & {"av", "fastapi", "starlette", "onnxruntime", "redis"} == set()


def test_the_lease_script_runs_each_stage_into_its_own_results(tmp_path: Path) -> None:
    """`bench/gpu/lease.sh`, the one command a device lease runs: its stages one after the other, each
    `run.sh` with its own weights and cache into its own JSON under $OUT, the trailing options (here the
    small checkpoint's) applied to every sweep stage, LEASE_ATTN_ARGS to the attention stage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASE_")}
    env |= {
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "WHEELHOUSE": str(tmp_path / "no-wheelhouse"),
        "CHORUS_DIALOGUE_DEVICE": "cpu",
        "CHORUS_BENCH_THREADS": "1",
        # The default stage (ctxkv8t: kv8t at ctx's context), ctx (bf16 is ctx at the checkpoint's
        # context), int8t and attn; ctx8 is ctx's context with int8t's weights.
        "LEASE_STAGES": "attn ctx ctxkv8t int8t",
        "LEASE_CTX_FRAMES": "60",  # the small checkpoint attends over 100
        "LEASE_INT8T_SLOTS": "1",  # one stage's slots, over the trailing options' too
        "LEASE_ATTN_ARGS": "--rows 2 --heads 4 --capacity 70 --dim 16 --repeats 2 --blocks 32,64 --warps 4",
    }
    args = ["--size", "small", "--slots", "2", "--ticks", "3", "--warmup-ticks", "1", "--baseline-ticks", "2"]
    args += [
        "--primer-tokens",
        "2",
        "--profile-ticks",
        "1",
    ]  # the int8 stages' 20, in Triton's interpreter: slow
    done = subprocess.run(
        ["bash", str(RUN.with_name("lease.sh")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("attn", "ctx", "ctxkv8t", "int8t"):
        assert f"== {stage} exit 0" in done.stdout, done.stdout[-2000:]
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == [
        "dialogue_gpu_ctx.json",
        "dialogue_gpu_ctxkv8t.json",
        "dialogue_gpu_int8t.json",
        "int8_attention.json",
    ]
    attention = json.loads((tmp_path / "int8_attention.json").read_text(encoding="utf-8"))
    reads = attention["reads"]
    assert list(reads) == ["bf16_sdpa", "copy", "compiled", "triton_b32_w4", "triton_b64_w4"]
    assert all(r["outcome"] == "measured" and r["ms_p50"] > 0 for r in reads.values()), reads
    # Every int8 read computes the attention of the dequantized cache; bf16 reads the unquantized one.
    assert all(r["l2_relative_to_fp32"] < 1e-2 for name, r in reads.items() if name != "bf16_sdpa"), reads
    assert reads["bf16_sdpa"]["l2_relative_to_fp32"] < 5e-2
    ctx = json.loads((tmp_path / "dialogue_gpu_ctx.json").read_text(encoding="utf-8"))
    kv8t = json.loads((tmp_path / "dialogue_gpu_ctxkv8t.json").read_text(encoding="utf-8"))
    assert [ctx["configuration"][k] for k in ("weights", "kv_cache", "kv_read")] == [
        "float",
        "float",
        "auto",
    ]
    assert [kv8t["configuration"][k] for k in ("weights", "kv_cache", "kv_read")] == [
        "float",
        "int8",
        "triton",
    ]
    assert ctx["finished"] and kv8t["finished"] and kv8t["int8_logits"]["l2_relative"] > 0
    assert ctx["configuration"]["context_frames"] == kv8t["configuration"]["context_frames"] == 60
    int8t = json.loads((tmp_path / "dialogue_gpu_int8t.json").read_text(encoding="utf-8"))
    assert int8t["finished"] and int8t["configuration"]["context_frames"] == 100
    assert [p["slots"] for p in int8t["points"]] == [1] and [p["slots"] for p in ctx["points"]] == [2]
    assert [int8t["configuration"][k] for k in ("weights", "kv_cache", "kv_read")] == [
        "int8",
        "int8",
        "triton",
    ]
    # The Triton kernel (in Triton's interpreter here) read the cache: the copy's logits, to rounding.
    assert kv8t["int8_logits"]["in_place_vs_copy"]["l2_relative"] < 1e-4
    assert kv8t["int8_logits"]["kv_read"] == int8t["int8_logits"]["kv_read"] == "triton"
    assert ctx["int8_logits"] is None
    assert kv8t["configuration"]["triton_tuning"] == {"block_positions": 128, "warps": 4}
    assert kv8t["points"][0]["profile"]["ticks"] == 1 and ctx["points"][0]["profile"]["ticks"] == 1


def test_the_lease_script_refuses_a_stage_it_does_not_know(tmp_path: Path) -> None:
    env = os.environ | {"OUT": str(tmp_path), "LEASE_STAGES": "fp4"}
    done = subprocess.run(
        ["bash", str(RUN.with_name("lease.sh"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "unknown stage fp4" in done.stderr
    assert not list(tmp_path.iterdir())

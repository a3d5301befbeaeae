#!/usr/bin/env bash
# One device lease's dialogue measurements in one command (a lease is about 15 minutes, one command at
# most 10), stage after stage, each into its own JSON under $OUT (the device tool's folder) or
# bench/results, each cut by `timeout` so that a slow or stuck stage still leaves the next its time.
# Every JSON is rewritten after each point, so a cut stage keeps what it measured.
#   bench/gpu/lease.sh [extra options for every sweep stage, e.g. --size small --ticks 5 for a CPU
#   rehearsal; the attn stage takes LEASE_ATTN_ARGS instead]
# LEASE_STAGES (default "ctxkv8t": what is still to measure), each with its length in seconds
# (LEASE_<STAGE>_S) and its slots replaceable (LEASE_<STAGE>_SLOTS):
#   ctxkv8t (400): bf16 weights, an int8 KV cache read by the Triton kernel and a shorter context
#                (LEASE_CTX_FRAMES, default 1500), 1000 ticks a point (a published figure), 128, 144, 152
#                slots. Measured on an H100 on 2026-11-27 (500 ticks: 96-144; 1000 ticks, with
#                LEASE_CTXKV8T_SLOTS=144,152: both real-time, 152 at the memory ceiling). The default:
#                the most sessions a card holds, the figure to measure first on another card;
#   kv8t (200):  bf16 weights and an int8 KV cache read by the Triton kernel (the CUDA worker's read),
#                500 ticks a point, 64 and 80 slots at the published context. Measured on an H100 on
#                2026-11-27 (80 real-time, at the memory ceiling; 72 in a second call; 80 again with
#                --ticks 1000);
#   int8t (230): int8 weights and an int8 KV cache, the cache read by the Triton kernel (--kv-read triton),
#                500 ticks a point, 64, 80, 96 slots. Measured on an H100 on 2026-11-27 at both the
#                64- and the 128-position tuning (64 real-time, 80 not), then with --ticks 1000 and
#                LEASE_INT8T_SLOTS=64, then 72 (64 real-time, 72 not). On a fresh machine its first
#                compile takes about a minute more than on a warm one: give it 250 s there;
#   ctx (240):   bf16 with a shorter attention context (CHORUS_DIALOGUE_CONTEXT; LEASE_CTX_FRAMES, default
#                1500), 1000 ticks a point, 64, 72, 80 slots. Measured on an H100 on 2026-11-27 (80 real-time);
#   ctx8 (170):  the same context with int8 weights and a bf16 cache, 500 ticks a point, 64 and 80 slots,
#                20 profiled ticks a point. Measured on an H100 on 2026-11-27 (64, then 80 and 88 with
#                --slots 80,88 in a second call: all real-time);
#   attn (120):  one attention step over a full cache at 64 sessions, every read (bf16, the copy, the
#                compiled read, the Triton kernel at six tunings), timed alone (bench/gpu_int8_attention.py;
#                LEASE_ATTN_ARGS passes it options, e.g. a small shape for a CPU rehearsal). Measured on an
#                H100 on 2026-11-27;
#   bf16 (330):  the bf16 sweep with moshi's batch-1 baseline, 1000 ticks a point; the slots go 32 and 40
#                first (the target and the memory ceiling), then 16, then 48 (out of memory at bf16 on
#                80 GB: the sweep stops there). Measured on an H100 on 2026-11-26;
#   int8 (230):  int8 weights and an int8 KV cache read by the compiled read, 500 ticks a point, 64, 80, 96
#                slots. Measured on an H100 on 2026-11-26 (not real-time);
#   kv8 (150):   bf16 weights and an int8 KV cache, the compiled read, 64 and 80 slots (48 measured on
#                2026-11-26: not real-time);
#   lora (300):  issue 16's figure alone: 32 sessions with no LoRA against 1, 4 and 8 distinct rank-128
#                adapters, each LoRA kernel, 200 ticks a variant (docs/performance.md, "LoRA adapters").
#                Measured on an H100 on 2026-11-27: the eager kernels' ticks are 4-10x, so all three
#                kernels need about 500 s (LEASE_LORA_S); `--lora-kernels grouped_graphs` alone, about 90 s.
#                bench/gpu_lora_graphs.py (BENCH_MODULE, about 10 s) checks that path's replays are right.
# The int8-cache stages (ctxkv8t, int8, int8t, kv8, kv8t) profile 20 more ticks a point (the LM step's kernels:
# where its time goes).
set -uo pipefail
cd "$(dirname "$0")/../.."
DIR=${OUT:-bench/results}
INT8=(--weights int8 --kv-cache int8 --ticks 500 --baseline-ticks 0 --slots 64,80,96 --profile-ticks 20)
CTX=(--context "${LEASE_CTX_FRAMES:-1500}")
KV8=(--weights float --kv-cache int8 --ticks 500 --baseline-ticks 0 --slots 64,80 --profile-ticks 20)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>/dev/null
for stage in ${LEASE_STAGES:-ctxkv8t}; do
  if [ "$stage" = attn ]; then
    seconds=${LEASE_ATTN_S:-120}
    echo "== attn, $(date +%T), at most $seconds s"
    # shellcheck disable=SC2086  # LEASE_ATTN_ARGS is a list of options
    BENCH_MODULE=bench.gpu_int8_attention timeout "$seconds" bench/gpu/run.sh ${LEASE_ATTN_ARGS:-} \
      --out "$DIR/int8_attention.json"
    echo "== attn exit $?, $(date +%T)"
    continue
  fi
  case $stage in
    bf16)  seconds=${LEASE_BF16_S:-330}; options=(--ticks 1000 --slots 32,40,16,48) ;;
    ctx)   seconds=${LEASE_CTX_S:-240}; options=("${CTX[@]}" --ticks 1000 --baseline-ticks 0 --slots 64,72,80) ;;
    ctx8)  seconds=${LEASE_CTX8_S:-170}
           options=("${CTX[@]}" --weights int8 --kv-cache float --ticks 500 --baseline-ticks 0 --slots 64,80 --profile-ticks 20) ;;
    int8)  seconds=${LEASE_INT8_S:-230}; options=("${INT8[@]}" --kv-read compiled) ;;
    int8t) seconds=${LEASE_INT8T_S:-230}; options=("${INT8[@]}" --kv-read triton) ;;
    kv8)   seconds=${LEASE_KV8_S:-150}; options=("${KV8[@]}" --kv-read compiled) ;;
    kv8t)  seconds=${LEASE_KV8T_S:-200}; options=("${KV8[@]}" --kv-read triton) ;;
    ctxkv8t) seconds=${LEASE_CTXKV8T_S:-400}
           options=("${CTX[@]}" "${KV8[@]}" --kv-read triton --ticks 1000 --slots 128,144,152) ;;
    lora)  seconds=${LEASE_LORA_S:-300}
           options=(--slots "" --baseline-ticks 0 --adapters 0,1,4,8 --adapter-rank 128 --adapter-batch 32 --ticks 200) ;;
    *) echo "unknown stage $stage (attn, bf16, ctx, ctx8, ctxkv8t, int8, int8t, kv8, kv8t, lora)" >&2; exit 2 ;;
  esac
  # LEASE_<STAGE>_SLOTS replaces a stage's slots (e.g. LEASE_INT8T_SLOTS=64), the trailing options' too:
  # it goes last, and the last --slots wins.
  slots_override="LEASE_${stage^^}_SLOTS"
  last=()
  [ -z "${!slots_override:-}" ] || last=(--slots "${!slots_override}")
  file=dialogue_gpu.json
  [ "$stage" = bf16 ] || file=dialogue_gpu_$stage.json
  echo "== $stage, $(date +%T), at most $seconds s"
  timeout "$seconds" bench/gpu/run.sh "${options[@]}" --budget-s $((seconds - 15)) --out "$DIR/$file" "$@" "${last[@]}"
  echo "== $stage exit $?, $(date +%T)"
done

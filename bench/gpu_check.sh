#!/usr/bin/env bash
# The one-call GPU check (BENCH.md): versions and card, `pytest tests/gpu -x -q`, every workload
# for llmbatch and the transformers peers, JSON under OUT_DIR, the table printed last.
#
#   bench/gpu_check.sh [--dry-run] [OUT_DIR]        OUT_DIR defaults to $OUT, then ./bench_out
#
# --dry-run (or BENCH_DRY_RUN=1): tiny shape on the CPU with workloads scaled to 5 %, ~1 minute;
# a smoke test of this script, never a figure. Runs from the tree (PYTHONPATH), never installs
# torch. Packages the bare GPU machine lacks (pytest, at least) travel as wheels in bench/wheels/
# (made here by bench/fetch_wheels.sh); each wheel whose module does not import is unpacked into
# a temporary dir added to PYTHONPATH. The engine path itself needs no pydantic/datasets.
# bitsandbytes travels the same way (the GPU machine has none): with
# BENCH_QUANTIZATION=bf16,nf4,int8 the bench runs W-RANDOM and W-BATCH1 again with nf4 and
# int8 (default bf16 only since stop 10, for time: stop 9 measured both; tests/gpu still
# checks their kernels). Without the wheel the quantized rows say bitsandbytes is missing.
# Env: PYTHON (default python3), BENCH_ARGS (extra bench.run flags, e.g. "--skip-peers";
# "--repeats 1": one run of each llmbatch workload an engine, not the median of 3 on a GPU),
# PYTEST_TIMEOUT (s, default 230), PYTEST_PATHS (default: all of tests/gpu, core files first),
# BENCH_RUN=0 (skip the bench: a tests-only call), BENCH_RESERVE (s the bench keeps from
# pytest's limit; default 220, 160 with --skip-peers in BENCH_ARGS),
# BENCH_ATTENTION=1 (attention micro-benchmark), BENCH_TIMEOUT (s, default 300), BENCH_MODEL_DIR,
# BENCH_QUANTIZATION (GPU runs only, default bf16), BENCH_PROFILE=0 (skip the
# profiled slice), BENCH_UNFUSED=1 (opt-in: W-RANDOM, W-PREFIX and
# W-BATCH1 once more with engine.fused_kernels off as system llmbatch-unfused, the A/B of the
# default; off by default for time; on CPU its rows say skipped).
# BENCH_GEMV_LAYOUTS=0 skips the M=1 GEMM dispatch micro-benchmark (default on, also in the
# dry run; first step, limit BENCH_GEMV_LAYOUTS_TIMEOUT, default 60 s;
# OUT_DIR/bench_gemv_layouts.json and .log).
# BENCH_SKINNY=1 (skinny-matmul micro-benchmark, GPU only; BENCH_SKINNY_TIMEOUT s, default 120;
# BENCH_SKINNY_ARGS: extra flags, e.g. "--pdl --m 1" or "--no-sweep").
# BENCH_SYNC_ROWS and BENCH_SKINNY_ROWS (default 0 since stop 10; both measured in stop 9):
# W-RANDOM, W-PREFIX and W-BATCH1 once more with engine.async_scheduling off (system
# llmbatch-sync: the A/B of the CUDA default) or engine.skinny_matmul on (llmbatch-skinny, not
# default), ~20 s each. BENCH_ASYNC=1 (default 0): llmbatch-async, async forced on (same as
# the default on CUDA).
# Since stop 17 the defaults include skinny_gemv (one-token steps on layers/gemv.py) and pdl
# (sm_90+). BENCH_OLD_DEFAULTS_ROWS (default 1 on a GPU, 0 in the dry run): W-RANDOM, W-PREFIX
# and W-BATCH1 once more with both off (llmbatch-old-defaults: the engine of stop 17's
# "llmbatch" rows, the A/B of the change; ~20 s). BENCH_NO_GEMV_ROWS (same default): with
# skinny_gemv off (llmbatch-no-gemv, PDL alone). BENCH_NO_PDL_ROWS=1 (opt-in): with pdl off
# (llmbatch-no-pdl, with a batch-1 profile: kernel times without PDL's overlap).
# Since stop 19 the defaults also include rotary_in_attention and gemv_weight_prefetch "tile"
# (auto). BENCH_PREV_DEFAULTS_ROWS (default 1 on a GPU): both off (llmbatch-prev-defaults: the
# engine of stops 17-18, the A/B of that change; a batch-1 profile).
# BENCH_GEMV_PREFETCH_ROWS=1, BENCH_GEMV_PREFETCH_L2_ROWS=1 (opt-in since stop 19):
# engine.gemv_weight_prefetch tile / l2 (llmbatch-gemv-prefetch: the first weight tile before
# the PDL wait, now the default; llmbatch-gemv-prefetch-l2: the weight slice into L2 before it,
# 0.90x at batch 1 in stop 19's sweep; each with a batch-1 profile).
# BENCH_ROTARY_ATTN_ROWS=1 (opt-in since stop 19, the default now): engine.rotary_in_attention
# (llmbatch-rotary-attn: decode steps rotate, store K/V and attend in one launch).
# BENCH_SKINNY_SPEC_ROWS=1 (opt-in since stop 19): W-SPEC once more with engine.skinny_matmul
# (llmbatch-skinny-spec: verify steps of k+1 tokens on the 16-row skinny kernels; ~15 s; needs
# W-SPEC among the bench's workloads).
# BENCH_GEMV_ROWS8_ROWS=1 (opt-in since stop 20): engine.gemv_max_rows 8 (llmbatch-gemv-rows8:
# W-SPEC and W-BATCH1, verify steps of k+1 tokens on the multi-row gemv kernel; needs W-SPEC
# among the bench's workloads for its question).
# BENCH_PREFILL_GRAPH_ROWS=1 (opt-in since stop 22): engine.prefill_graph_max_tokens 512
# (llmbatch-prefill-graphs: W-BATCH1 and W-SPEC with one-sequence prefills replayed from CUDA
# graphs; read W-BATCH1's TTFT in the table and W-SPEC b=1's ratios).
# BENCH_NO_GRAPH_LOGITS_ROWS=1 (opt-in since stop 23): engine.graph_logits off
# (llmbatch-no-graph-logits: W-BATCH1 and W-SPEC with the LM head and greedy argmax outside
# the decode graphs, the A/B of that new default; W-SPEC needs to be among the bench's
# workloads). bench_batch1's "graph logits flipped" row is the same-engine A/B of W-BATCH1.
# BENCH_PDL_ROWS=1 (opt-in; repeats the default on sm_90+): llmbatch-pdl.
# BENCH_SKINNY_PDL_ROWS=1 (opt-in): engine.skinny_matmul and engine.pdl (llmbatch-skinny-pdl).
# BENCH_GEMV_ROWS=1 (opt-in since stop 17): skinny_matmul, skinny_gemv and pdl
# (llmbatch-skinny-gemv-pdl: the 16-row skinny tiles for 2-16-token steps too; W-RANDOM 0.93x
# in stop 17).
# BENCH_PREFETCH_ROWS=1 (opt-in since stop 13, where the L2 prefetch was 4-8 % slower at batch
# 1): the same three with engine.l2_prefetch on (llmbatch-l2prefetch; ~20 s).
# The A/B rows run after the peers: a bench cut by its limit loses them first; for a focused
# call add BENCH_ARGS="--skip-peers". BENCH_BATCH1_SWEEP (default 1 on a GPU): W-BATCH1 under each
# decode option of bench/bench_batch1.py (L2-prefetch plans, fused split reduce, argmax, rope
# table, attention splits and tiles, PDL, sync scheduling; then the winners combined) on one
# engine (9 rows since stop 23: defaults, graph logits flipped, gemv flipped, the two gemv
# weight prefetches flipped, stop 17's gemv tiles, PDL flipped, rotary in attention flipped,
# defaults; and the winners row when an option wins;
# BENCH_BATCH1_ARGS=--all adds the 12 options measured slower; 21 rows and the winners row,
# ~90 s: more than the ~70 s a whole check keeps for the sweep, where stop 17's 16 rows were
# cut; limit BENCH_BATCH1_TIMEOUT, default 90 s; OUT_DIR/bench_batch1.json, written after
# every row).
# Whole check: GPU_CHECK_BUDGET s (default 575, under the device tool's 600 s per command);
# each step's limit above is cut so the steps after it keep their share (pytest <= 230 s,
# bench <= 300 s, the batch-1 sweep <= 90 s, set-up ~20 s; stop 9 on an H200: tests/gpu
# needed > 160 s, stop 10 added ~60 s of tests; the bench with peers ~280 s including the
# sync, skinny and quantized rows, now off by default).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=bench/ordered_test_paths.sh
source "$ROOT/bench/ordered_test_paths.sh"
DRY="${BENCH_DRY_RUN:-0}"
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (use --dry-run or an output dir)" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/bench_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
# The GPU machine reaches nothing: never let transformers wait on the hub (e.g. kernel lookups).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
T0=$(date +%s)
# The device tool brings back at most 8 files from $OUT (a run with profiles and the attention
# log made 11, and results.json was the one left behind): there, keep results.json, table.md
# and the console log loose and pack every other file into details.tar.gz. On exit, also when
# a signal stops the script before its end.
pack_results() {
  if [ -n "${OUT:-}" ] && [ "$OUT_DIR" = "$OUT" ] && [ "$DRY" != 1 ]; then
    (cd "$OUT_DIR" && find . -maxdepth 1 -type f ! -name results.json ! -name table.md \
       ! -name gpu_check.log ! -name details.tar.gz -printf '%P\n' \
       | tar czf details.tar.gz --remove-files -T -) \
      && echo "gpu_check: logs and profiles packed into $OUT_DIR/details.tar.gz"
  fi
}
trap pack_results EXIT
trap 'exit 143' TERM   # a stopped script packs too (the EXIT trap runs on exit)
# The whole script keeps within GPU_CHECK_BUDGET seconds (default 575: the device tool stops a
# command at 600 s, and what is under $OUT must be packed before then). A step's time limit is
# its own setting, cut to what the budget leaves once RESERVE seconds are kept for the steps
# after it (at least 10 s).
BUDGET="${GPU_CHECK_BUDGET:-575}"
# The A/B rows and the batch-1 sweep default on for a GPU run, off in the dry run.
AB_DEFAULT=1; [ "$DRY" = 1 ] && AB_DEFAULT=0
limit() {   # limit OWN RESERVE -> seconds
  local left=$(( BUDGET - ($(date +%s) - T0) - $2 ))
  local n=$(( $1 < left ? $1 : left ))
  echo $(( n < 10 ? 10 : n ))
}

# Wheels for missing packages, unpacked (a wheel is a zip of an installed layout) into a temp
# dir appended to PYTHONPATH; only wheels whose module is missing, so nothing is shadowed.
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  DEPS="$(mktemp -d "${TMPDIR:-/tmp}/llmbatch-pydeps.XXXXXX")"
  for whl in bench/wheels/*.whl; do
    mod="$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')"
    if ! "$PY" -c "import $mod" 2>/dev/null; then
      "$PY" -m zipfile -e "$whl" "$DEPS" && echo "gpu_check: unpacked $(basename "$whl")"
    fi
  done
  export PYTHONPATH="$PYTHONPATH:$DEPS"
fi

echo "=== llmbatch gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo "${BENCH_COMMIT:-unknown}") dry_run=$DRY"
"$PY" - <<'PYEOF'
import platform, torch, transformers
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"missing ({type(e).__name__})"
print(f"python {platform.python_version()} | torch {torch.__version__} (cuda {torch.version.cuda}) "
      f"| transformers {transformers.__version__} | triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("card: none (CUDA not available)")
PYEOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
fi

# M=1 GEMM dispatch micro-benchmark (bench/bench_gemv_layouts.py, default on; ~20 s on a GPU
# for the cuBLAS rows plus ~7 Triton compiles for the gemv rows, ~15 s in the dry run, which
# runs it on the CPU): the five decode matmul shapes through F.linear and other entry points /
# weight layouts (mm with W^T stored, mv, M padded to 2/4/8, W as the A operand, zero bias,
# cuBLASLt preferred, fp32 split-K reduce) and our one-row Triton GEMV (layers/gemv.py) at 7
# tiles besides its table's pick (the first of them is the pick again). First, before pytest,
# so a tight budget never cuts it; its table goes to the console.
# Its limit is its own (BENCH_GEMV_LAYOUTS_TIMEOUT, default 60 s); the later steps' limits
# shrink by what it used.
if [ "${BENCH_GEMV_LAYOUTS:-1}" = 1 ]; then
  echo "=== M=1 GEMM layouts (bench_gemv_layouts)"
  GEMV_FLAG=""; [ "$DRY" = 1 ] && GEMV_FLAG="--dry-run"
  # shellcheck disable=SC2086
  timeout "$(limit "${BENCH_GEMV_LAYOUTS_TIMEOUT:-60}" 0)" "$PY" -m bench.bench_gemv_layouts \
    $GEMV_FLAG --out "$OUT_DIR/bench_gemv_layouts.json" >"$OUT_DIR/bench_gemv_layouts.log" 2>&1
  GEMV_RC=$?
  [ "$GEMV_RC" = 0 ] || echo "bench_gemv_layouts: exit $GEMV_RC (124: cut at its limit)"
  # Its stdout (errors, the table, the per-token line), not the per-shape progress lines.
  grep -v '^\[gemv\] ' "$OUT_DIR/bench_gemv_layouts.log"
fi

# GPU tests (they skip themselves without CUDA). pytest exit 5 = nothing collected.
if "$PY" -c "import pytest" 2>/dev/null; then
  # Core kernels and graphs first, so a time limit cuts the optional tests, not them; no -x:
  # a GPU run is scarce, and seeing every failure at once beats stopping at the first.
  echo "=== pytest tests/gpu -q (attention, graphs, fused kernels, L2 prefetch, async, int8/nf4 GEMMs, then skinny)"
  # SIGINT at the limit (then KILL 20 s later): pytest stops like on Ctrl-C and still prints
  # its failures and --durations (stop 9's SIGTERM at 160 s left only the progress dots).
  # An inherited "SIGINT ignored" does not defeat it: timeout handles INT itself, so its
  # child starts with the default disposition and Python installs KeyboardInterrupt (checked
  # with coreutils timeout under `trap '' INT`).
  # shellcheck disable=SC2086
  # Skinny matmul (opt-in, measured slower) last: a cut run loses it first.
  # What the later steps keep: the bench ~220 s with peers, ~160 s without (4 engines since stop
  # 19: llmbatch and the 3 A/B variants on by default, ~32 s each with bench.run's 3 repeats of
  # W-RANDOM, W-PREFIX and W-BATCH1, ~6 s of it; BENCH_RESERVE overrides; 0 with
  # BENCH_RUN=0), the batch-1 sweep ~70 s when it runs. Stop 17's focused call kept a fixed
  # 290 s whatever ran after, and its pytest got 10 s of a 300 s budget.
  PYTEST_RESERVE=0
  if [ "${BENCH_RUN:-1}" = 1 ]; then
    case " ${BENCH_ARGS:-} " in
      *" --skip-peers "*) PYTEST_RESERVE=${BENCH_RESERVE:-160} ;;
      *) PYTEST_RESERVE=${BENCH_RESERVE:-220} ;;
    esac
  fi
  [ "${BENCH_BATCH1_SWEEP:-$AB_DEFAULT}" = 1 ] && PYTEST_RESERVE=$(( PYTEST_RESERVE + 70 ))
  # + 20 s: timeout's kill grace after the SIGINT, should pytest not stop at once.
  PYTEST_LIMIT=$(limit "${PYTEST_TIMEOUT:-230}" $(( PYTEST_RESERVE + 20 )))
  # -v: the log names every test that ran (stop 17's -q log of a cut run held only dots).
  # The files in this order, then the rest of tests/gpu (ordered_test_paths: pytest alone
  # would sort them all).
  # shellcheck disable=SC2046
  timeout -s INT -k 20 "$PYTEST_LIMIT" "$PY" -m pytest $(ordered_test_paths \
    ${PYTEST_PATHS:-tests/gpu/test_device_gpu.py \
    tests/gpu/test_triton_attention_gpu.py \
    tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_bf16_vs_transformers.py \
    tests/gpu/test_fused_kernels_gpu.py tests/gpu/test_triton_argmax_gpu.py \
    tests/gpu/test_l2_prefetch_gpu.py tests/gpu/test_pdl_gpu.py \
    tests/gpu/test_async_scheduling_gpu.py \
    tests/gpu/test_int8_matmul_gpu.py tests/gpu/test_nf4_matmul_gpu.py tests/gpu}) \
    --maxfail=20 -v -rfE --durations=12 -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/pytest_gpu.log" | tail -n 40
  PYTEST_RC=${PIPESTATUS[0]}
  [ "$PYTEST_RC" = 5 ] && PYTEST_RC="5 (no tests collected)"
  [ "$PYTEST_RC" = 124 ] && PYTEST_RC="124 (cut at $PYTEST_LIMIT s)"
  [ "$PYTEST_RC" = 137 ] && PYTEST_RC="137 (killed 20 s after its $PYTEST_LIMIT s limit)"
else
  echo "=== pytest not importable and no wheel in bench/wheels: GPU tests NOT run"
  PYTEST_RC="not run"
fi

# Attention kernel micro-benchmark (GPU only, ~20 s): achieved KV bandwidth per scenario.
if [ "${BENCH_ATTENTION:-0}" = 1 ] && [ "$DRY" != 1 ]; then
  echo "=== attention micro-benchmark"
  timeout "${BENCH_ATTENTION_TIMEOUT:-120}" "$PY" \
    -m llmbatch.runtime.attention.triton_kernels.bench_attention --sweep 2>&1 \
    | tee "$OUT_DIR/bench_attention.log"
fi

# Skinny matmul micro-benchmark (GPU only, opt-in, est. ~80 s): layers/skinny_matmul.py vs
# cuBLAS and the unfused ops on the 1B decode shapes, a tile sweep (split-K: qkv, o_proj, down);
# table in the log, rows in JSON (written after every case: a timeout keeps what ran).
if [ "${BENCH_SKINNY:-0}" = 1 ] && [ "$DRY" != 1 ]; then
  echo "=== skinny matmul micro-benchmark"
  # shellcheck disable=SC2086
  timeout "${BENCH_SKINNY_TIMEOUT:-120}" "$PY" -m bench.bench_skinny_matmul \
    --out "$OUT_DIR/bench_skinny_matmul.json" ${BENCH_SKINNY_ARGS:-} 2>&1 \
    | tee "$OUT_DIR/bench_skinny_matmul.log"
fi

echo "=== bench ($(( $(date +%s) - T0 )) s so far)"
if [ "$DRY" = 1 ]; then
  MODE_ARGS=(--shape tiny --device cpu --scale 0.05)
  MODEL_DIR="${BENCH_MODEL_DIR:-${TMPDIR:-/tmp}/llmbatch-bench-model-tiny}"
else
  MODE_ARGS=(--shape 1b --quantization "${BENCH_QUANTIZATION:-bf16}")
  MODEL_DIR="${BENCH_MODEL_DIR:-${TMPDIR:-/tmp}/llmbatch-bench-model-1b}"
fi
[ "${BENCH_UNFUSED:-0}" = 1 ] && MODE_ARGS+=(--unfused)
[ "${BENCH_ASYNC:-0}" = 1 ] && MODE_ARGS+=(--async-scheduling)
[ "${BENCH_SYNC_ROWS:-0}" = 1 ] && MODE_ARGS+=(--sync-scheduling)
[ "${BENCH_SKINNY_ROWS:-0}" = 1 ] && MODE_ARGS+=(--skinny)
[ "${BENCH_OLD_DEFAULTS_ROWS:-$AB_DEFAULT}" = 1 ] && MODE_ARGS+=(--old-defaults)
[ "${BENCH_NO_GEMV_ROWS:-$AB_DEFAULT}" = 1 ] && MODE_ARGS+=(--no-gemv)
[ "${BENCH_NO_PDL_ROWS:-0}" = 1 ] && MODE_ARGS+=(--no-pdl)
[ "${BENCH_PREV_DEFAULTS_ROWS:-$AB_DEFAULT}" = 1 ] && MODE_ARGS+=(--prev-defaults)
[ "${BENCH_GEMV_PREFETCH_ROWS:-0}" = 1 ] && MODE_ARGS+=(--gemv-prefetch)
[ "${BENCH_GEMV_PREFETCH_L2_ROWS:-0}" = 1 ] && MODE_ARGS+=(--gemv-prefetch-l2)
[ "${BENCH_ROTARY_ATTN_ROWS:-0}" = 1 ] && MODE_ARGS+=(--rotary-in-attention)
[ "${BENCH_SKINNY_SPEC_ROWS:-0}" = 1 ] && MODE_ARGS+=(--skinny-spec)
[ "${BENCH_GEMV_ROWS8_ROWS:-0}" = 1 ] && MODE_ARGS+=(--gemv-rows8)
[ "${BENCH_PREFILL_GRAPH_ROWS:-0}" = 1 ] && MODE_ARGS+=(--prefill-graphs)
[ "${BENCH_NO_GRAPH_LOGITS_ROWS:-0}" = 1 ] && MODE_ARGS+=(--no-graph-logits)
[ "${BENCH_PDL_ROWS:-0}" = 1 ] && MODE_ARGS+=(--pdl)
[ "${BENCH_SKINNY_PDL_ROWS:-0}" = 1 ] && MODE_ARGS+=(--skinny-pdl)
[ "${BENCH_GEMV_ROWS:-0}" = 1 ] && MODE_ARGS+=(--skinny-gemv-pdl)
[ "${BENCH_PREFETCH_ROWS:-0}" = 1 ] && MODE_ARGS+=(--l2-prefetch)
# A profiled 64-request W-RANDOM slice after llmbatch's bf16 rows (~10 s on a GPU): the kernel
# table for the next tuning session (OUT_DIR/profile_llmbatch.txt). BENCH_PROFILE=0 skips it.
[ "${BENCH_PROFILE:-1}" = 1 ] && MODE_ARGS+=(--profile)
# The checkpoint lives outside OUT_DIR: 2.47 GB must not travel back with the results.
# shellcheck disable=SC2086
if [ "${BENCH_RUN:-1}" = 1 ]; then
  SWEEP_RESERVE=0; [ "${BENCH_BATCH1_SWEEP:-$AB_DEFAULT}" = 1 ] && SWEEP_RESERVE=70
  BENCH_LIMIT=$(limit "${BENCH_TIMEOUT:-300}" "$SWEEP_RESERVE")   # the batch-1 sweep after it
  timeout "$BENCH_LIMIT" "$PY" -m bench.run "${MODE_ARGS[@]}" --out "$OUT_DIR" \
    --model-dir "$MODEL_DIR" ${BENCH_ARGS:-} >"$OUT_DIR/bench_stdout.log" \
    2> >(tee "$OUT_DIR/bench_stderr.log" | grep -E '^\[bench|Error|error' >&2)
  BENCH_RC=$?
  wait
  [ "$BENCH_RC" = 124 ] && BENCH_RC="124 (timed out after $BENCH_LIMIT s)"
else
  echo "bench skipped (BENCH_RUN=0)"
  BENCH_RC=0
fi

# Batch-1 option sweep (GPU default, ~50 s; BENCH_BATCH1_SWEEP=0 skips): W-BATCH1 on one engine
# per option of bench/bench_batch1.py, on the checkpoint bench.run just used.
if [ "${BENCH_BATCH1_SWEEP:-$AB_DEFAULT}" = 1 ]; then
  echo "=== batch-1 options, W-BATCH1 ($(( $(date +%s) - T0 )) s so far)"
  # shellcheck disable=SC2086
  timeout "$(limit "${BENCH_BATCH1_TIMEOUT:-90}" 0)" "$PY" -m bench.bench_batch1 --out "$OUT_DIR" \
    --model-dir "$MODEL_DIR" ${BENCH_BATCH1_ARGS:-} 2>&1 | tee "$OUT_DIR/bench_batch1.log" | grep -E '^batch1|Error'
fi

echo "=== gpu_check done in $(( $(date +%s) - T0 )) s: pytest rc=$PYTEST_RC, bench rc=$BENCH_RC, JSON in $OUT_DIR"
# bench.run's stdout: the label line, any FAILED line, then the table (printed last). When the
# bench was cut short, the table of what it measured, rebuilt from the partial JSON.
if grep -qs '^workload | system' "$OUT_DIR/bench_stdout.log"; then
  cat "$OUT_DIR/bench_stdout.log"
elif [ "${BENCH_RUN:-1}" != 1 ]; then
  :   # no bench this call
elif [ -f "$OUT_DIR/results.json" ]; then
  echo "PARTIAL (bench did not finish): table of the figures measured so far"
  "$PY" -m bench.report "$OUT_DIR/results.json"
else
  echo "no results: see $OUT_DIR/bench_stderr.log"
fi
if [ "$BENCH_RC" != 0 ] || { [ "$PYTEST_RC" != 0 ] && [ "$PYTEST_RC" != "5 (no tests collected)" ]; }; then
  exit 1
fi
exit 0

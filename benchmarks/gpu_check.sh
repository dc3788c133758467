#!/usr/bin/env bash
# One prepared GPU check (issue 17), to fit one call of ~8 minutes on one H100/H200:
#
#   benchmarks/gpu_check.sh [--out DIR] [--no-install] [--python PY] [--base-batch N]
#   benchmarks/gpu_check.sh --cpu      # dry run: every part at tiny size on the CPU
#
# Parts, each under its own `timeout` (a part that runs out is reported, the next runs):
#   0. install: if jax does not see a GPU, pip-installs the CUDA build of the installed
#      jax version by name (jax[cuda13]==V, else jax[cuda12]==V; with $WHEELS set,
#      offline from that folder);
#   1. base64: the paper-width base stage (configs/base64.py, bf16, remat 'full') train
#      step via benchmarks.sharding (dp, one device) with MFU; batch --base-batch (32),
#      halved until it fits, then depth scaled (num_res_blocks 3 → 1) if even 4 does not:
#      the summary says which;
#   2. attention: benchmarks.kernels --only attention (xla, chunked, cudnn rows);
#   3. demo: the demo base stage's images/s, bare step and whole loop (benchmarks.train_loop);
#   4. if_sampling: IF-shaped stage I guided sampling at 64×64 (benchmarks.if_sampling:
#      the converted stage's stage.sample).
# Writes under $OUT (default ./gpu_out): gpu_check.md, gpu_check.json, gpu_check.log and
# one JSON per part (7 files).
set -uo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=gpu
INSTALL=1
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_out}
BASE_BATCH=32
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--dry-run) MODE=cpu ;;
    --no-install) INSTALL=0 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --python) PY=${2:?--python needs an interpreter}; shift ;;
    --python=*) PY=${1#--python=} ;;
    --base-batch) BASE_BATCH=${2:?--base-batch needs a number}; shift ;;
    --base-batch=*) BASE_BATCH=${1#--base-batch=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BASE_BATCH" in ''|*[!0-9]*) echo "gpu_check.sh: --base-batch must be a number" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
MD=$OUT/gpu_check.md
STATUS=$OUT/.status.tsv
: > "$LOG"; : > "$STATUS"
export PYTHONUNBUFFERED=1
LIMIT_SCALE=1   # the CPU dry run compiles slowly on a shared machine: longer limits
if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  INSTALL=0
  LIMIT_SCALE=4
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi
say() { echo "$*" | tee -a "$LOG"; }

# part NAME LIMIT_S CMD...: runs CMD under timeout, appends its output to the log and
# records "NAME<tab>status<tab>seconds" (status: ok, timed out, failed rc=N).
part() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timed out"; elif [ $rc -ne 0 ]; then st="failed rc=$rc"; fi
  printf '%s\t%s\t%s\n' "$name" "$st" "$((SECONDS - t0))" >> "$STATUS"
  say "== $name: $st in $((SECONDS - t0))s"
  return $rc
}

# 0. install ------------------------------------------------------------------------
has_gpu() { "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; }
JAX_VERSION=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null) || {
  echo "gpu_check.sh: $PY cannot import jax" >&2; exit 1; }
# (timeout runs programs, not shell functions: the install loop is its own bash -c.)
INSTALL_LOOP='extra=(); [ -n "${WHEELS:-}" ] && extra=(--no-index --find-links "$WHEELS")
for cu in cuda13 cuda12; do
  "$PY" -m pip install -q "${extra[@]}" "jax[$cu]==$JAX_VERSION" &&
    { echo "installed jax[$cu]==$JAX_VERSION"; exit 0; }
done; exit 1'
if [ "$INSTALL" = 1 ] && ! has_gpu; then
  export PY JAX_VERSION
  part install 120 bash -c "$INSTALL_LOOP"
fi
if [ "$MODE" = gpu ] && ! has_gpu; then
  say "jax $JAX_VERSION sees no GPU (after the install step): stopping. Use --cpu for a dry run."
  exit 1
fi
say "jax $("$PY" -c 'import jax; print(jax.__version__, jax.devices()[0].device_kind)')"

# 1. paper-width base stage -----------------------------------------------------------
if [ "$MODE" = cpu ]; then
  # Same config file and flags, tiny widths: checks the command, not the speed.
  BASE_SIZE=(--config.stages.base64.model.channels="(32,32,32,32)"
             --config.stages.base64.model.num_res_blocks=1
             --config.stages.base64.model.time_embed_dim=64
             --config.stages.base64.model.text_proj_dim=64
             --config.stages.base64.model.head_dim=16)
  BASE_BATCH=2; BASE_MIN=2; BASE_LIMIT=200
else
  BASE_SIZE=(); BASE_MIN=4; BASE_LIMIT=200
fi
base_ok() {   # did the last base run report a row with status ok?
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["rows"][0]; sys.exit(r["status"] != "ok")' \
    "$OUT/base64_step.json" 2>/dev/null
}
run_base() {   # run_base LIMIT_S BATCH [extra flags]: one benchmarks.sharding run under part
  local limit=$1 batch=$2; shift 2
  rm -f "$OUT/base64_step.json"
  part "base64 batch $batch${1:+ $*}" "$limit" "$PY" -m benchmarks.sharding \
    --config configs/base64.py --stage base64 --devices 1 --strategies dp --batch "$batch" \
    --steps 5 --warmup 2 --json "$OUT/base64_step.json" "${BASE_SIZE[@]}" "$@"
}
BASE_NOTE=""
BASE_START=$SECONDS
b=$BASE_BATCH
while :; do
  left=$((BASE_LIMIT - (SECONDS - BASE_START) / LIMIT_SCALE))
  [ $left -gt 20 ] || break
  run_base "$left" "$b" && base_ok && { BASE_NOTE="batch $b, full depth"; break; }
  [ $b -le $BASE_MIN ] && break
  b=$((b / 2))
done
if [ -z "$BASE_NOTE" ]; then
  left=$((BASE_LIMIT + 60 - (SECONDS - BASE_START) / LIMIT_SCALE))
  if [ $left -gt 20 ] && run_base "$left" "$BASE_MIN" \
       --config.stages.base64.model.num_res_blocks=1 && base_ok; then
    BASE_NOTE="batch $BASE_MIN, depth scaled: num_res_blocks 3 → 1 (full depth did not fit)"
  else
    BASE_NOTE="no base64 row ran to completion"
  fi
fi
say "base64: $BASE_NOTE"

# 2. attention kernels -------------------------------------------------------------------
part attention 60 "$PY" -m benchmarks.kernels --only attention --no-torch \
  --repeats "$([ "$MODE" = cpu ] && echo 2 || echo 20)" --json "$OUT/attention.json"

# 3. demo train step images/s ------------------------------------------------------------
if [ "$MODE" = cpu ]; then DEMO_ARGS=(--config configs/demo.py:tiny --steps 3)
else DEMO_ARGS=(--config configs/demo.py); fi
part demo 90 "$PY" -m benchmarks.train_loop "${DEMO_ARGS[@]}" --stage base --json "$OUT/demo.json"

# 4. IF-shaped stage I guided sampling ---------------------------------------------------
if [ "$MODE" = cpu ]; then
  IF_ARGS=(--width 32 --batch 1 --steps 2 --repeats 1 --resolution 16)
else
  IF_ARGS=(--width 320 --batch 16 --steps 100 --dtype bfloat16 --repeats 2)
fi
part if_sampling 90 "$PY" -m benchmarks.if_sampling "${IF_ARGS[@]}" --json "$OUT/if_sampling.json"

# Summary --------------------------------------------------------------------------------
"$PY" - "$OUT" "$MODE" "$BASE_NOTE" <<'EOF' | tee -a "$LOG"
import json, os, sys
out, mode, base_note = sys.argv[1:4]
def load(name):
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
status = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, ".status.tsv"))]
res = {"mode": mode, "parts": [{"part": p, "status": s, "seconds": int(t)} for p, s, t in status],
       "base64": load("base64_step.json"), "base64_note": base_note,
       "attention": load("attention.json"), "demo": load("demo.json"),
       "if_sampling": load("if_sampling.json")}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
  json.dump(res, f, indent=1)
md = [f"# gpu_check ({mode})", "", "| part | status | s |", "|---|---|---|"]
md += [f"| {p} | {s} | {t} |" for p, s, t in status]
def step_line(name, r):
  if not r:
    return f"* {name}: no result"
  row, meta = r["rows"][0], r["meta"]
  ms = "—" if row["step_s"] is None else f"{1e3 * row['step_s']:.1f} ms"
  mfu = "—" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
  ips = "—" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"
  return (f"* {name}: {meta['machine']}, batch {row['batch']}: step {ms}, {ips} img/s, "
          f"MFU {mfu}, peak {(row['peak_bytes'] or 0) / 2**30:.1f} GiB ({row['status']})")
md += ["", step_line(f"base64 ({base_note})", res["base64"])]
d = res["demo"]
md += [f"* demo base ({d['machine']}, batch {d['batch']}): bare step "
       f"{d['bare_images_per_s']:.1f} img/s, whole loop {d['loop_images_per_s']:.1f} img/s; "
       f"predicted training {d['predicted_training_s'] / 60:.1f} min" if d else "* demo base: no result"]
if res["attention"]:
  md += ["* attention (IF shape): " + "; ".join(
      f"{r['kernel'].split(')')[0]}): {r['jax_fwd_ms']:.2f} / {r['jax_fwd_bwd_ms']:.2f} ms"
      for r in res["attention"]["rows"])]
s = res["if_sampling"]
if s:
  md += [f"* IF-I width {s['width']} ({s['params'] / 1e6:.0f}M, {s['dtype']}), B={s['batch']}, "
         f"{s['steps']} guided steps: {s['sample_s']:.2f} s, {s['images_per_s']:.2f} img/s"]
with open(os.path.join(out, "gpu_check.md"), "w") as f:
  f.write("\n".join(md) + "\n")
print("\n".join(md))
EOF
rm -f "$STATUS"

#!/usr/bin/env bash
# pi-lora's GPU benchmarks on one CUDA machine with the project installed (or its offline bundle).
#
#   bash bench/gpu.sh smoke     # quick checks (a few minutes): versions, imports, `pi-lora train` and
#                               # `pi-lora eval` on a tiny model, bench/compare.py on a tiny model,
#                               # the layer split (bench/gpu_split.py)
#   bash bench/gpu.sh 7b        # bench/compare.py: LLaMA-7B-shaped NF4 memory and speed, the usual
#                               # transformers + peft loop against pi-lora's, one process per point
#   bash bench/gpu.sh long      # bench/compare.py --suite long (8 minutes at most, time-boxed): LLaMA-7B
#                               # and Llama-3-8B shapes at 16k-128k: the usual loop, pi-lora's fastest
#                               # settings for 24 and 80 GiB and its lowest memory, unsloth beside them
#                               # (its wheels from the bundle, in a site of their own), the Liger check
#                               # (bench/kernels_check.py); the plan's longest lengths and 512k figure
#   bash bench/gpu.sh smollm2   # bench/smollm2_pi.sh: SmolLM2-135M extended 8k -> 32k by PI:
#                               # base evaluations, `pi-lora train`, evaluation of the adapter
#   bash bench/gpu.sh full      # 7b, then smollm2
#
# Without CUDA each part runs its CPU version on tiny models, which checks the scripts: compare.py
# --device cpu --tiny, gpu_split.py --devices cpu,cpu; smollm2 needs a GPU and says it skipped.
#
# A machine without network access: run bench/gpu_prepare.sh on one with it and copy the checkout,
# with the .gpu/ bundle it writes, across. gpu.sh installs the bundle's wheels (into $SITE, beside
# the machine's own torch and CUDA) and uses its SmolLM2 GGUF and KJV text.
#
# Outputs, in $OUT: gpu-PART.log; compare.json and compare.md (the section bench/compare.py also
# writes to docs/benchmarks.md); smollm2-tables.md (perplexity, by-position and passkey tables for
# docs/results.md) and smollm2.tar.gz (results.json files, plots, metrics, logs).
#
# Settings (environment): PYTHON (python3), OUT (.gpu/out), SITE (/tmp/pi-lora-site), LENGTHS (7b
# part: 16384,32768,65536), LONG_BUDGET (long part: seconds for its points, 450; 150 on a CPU),
# UNSLOTH_SITE (/tmp/pi-lora-unsloth-site: unsloth's packages, for its process only), SM_STEPS (300), SM_ACCUM (1), SM_LR (2e-4), SM_TARGET (32768),
# SM_LENGTHS (2048,...,32768), SM_STRIDE (256), SM_DEPTHS (8), SM_TRIALS (3), SM_PASSKEY (1).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PART=${1:-full}
OUT=${OUT:-$REPO/.gpu/out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/pi-lora-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON

say() { echo "[gpu.sh $(date +%H:%M:%S) +${SECONDS}s] $*"; }

setup() {
  if [ -f .gpu/SHA256SUMS ]; then
    (cd .gpu && sha256sum -c --quiet --ignore-missing SHA256SUMS) || { say "the .gpu/ bundle does not match its SHA256SUMS"; return 1; }
  fi
  if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    say "installing the bundle's $(ls .gpu/wheels/*.whl | wc -l) wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu/wheels/*.whl 2>&1 | grep -v "already exists" || true
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; fi
  "$PYTHON" - <<'PY' || true
import importlib.metadata as md
names = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "datasets", "gguf", "safetensors"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        found.append(f"{n} MISSING")
print("versions:", ", ".join(found))
import torch
print("cuda:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
}

has_cuda() { "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

import_check() {
  "$PYTHON" - <<'PY'
import pi_lora.train, pi_lora.evaluate, pi_lora.cli, pi_lora.merge, pi_lora.export  # noqa: F401
import bitsandbytes, datasets, gguf, pydantic, peft  # noqa: F401
print("imports ok: pi_lora (train, evaluate, cli, merge, export), bitsandbytes, datasets, gguf, pydantic, peft")
PY
}

cli_check() {  # pi-lora's own commands end to end on a tiny model: train (3 steps), then eval
  local work=/tmp/pi-lora-smoke
  rm -rf "$work"
  "$PYTHON" -c "from pathlib import Path; from pi_lora.demo import build_tiny_llama; build_tiny_llama(Path('$work/base'))" \
    > /dev/null 2>&1 || return 1
  "$PYTHON" -m pi_lora train --base "$work/base" --target-len 1024 --data demo --steps 3 --grad-accum 1 \
    --set train.warmup_steps=1 --output "$work/run" > "$work.log" 2>&1 || { tail -15 "$work.log"; return 1; }
  grep -E "^step |planned|measured" "$work.log" | tail -4 || true
  "$PYTHON" -m pi_lora eval "$work/run" --lengths 256,1024 --windows 1 --no-passkey --data demo \
    --output "$work/eval" > "$work-eval.log" 2>&1 || { tail -15 "$work-eval.log"; return 1; }
  tail -6 "$work-eval.log"
}

part_7b() {
  local args=(--lengths "${LENGTHS:-16384,32768,65536}")
  has_cuda || args=(--device cpu --tiny)
  say "7B part: bench/compare.py ${args[*]}"
  "$PYTHON" bench/compare.py "${args[@]}" --out "$OUT/compare.json" --md "$OUT/compare.md"
}

part_long() {
  local budget=${LONG_BUDGET:-450} args=(--suite long)
  has_cuda || { budget=${LONG_BUDGET:-150}; args+=(--device cpu); }
  if ls .gpu/unsloth-wheels/*.whl >/dev/null 2>&1; then
    # unsloth patches transformers on import and wants transformers <= 5.17 and datasets < 5: its own
    # site, first on the path of its own process only (bench/unsloth_point.py)
    export UNSLOTH_SITE=${UNSLOTH_SITE:-/tmp/pi-lora-unsloth-site}
    say "installing the bundle's $(ls .gpu/unsloth-wheels/*.whl | wc -l) unsloth wheels into $UNSLOTH_SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$UNSLOTH_SITE" \
      .gpu/unsloth-wheels/*.whl 2>&1 | grep -v "already exists" || true
  fi
  say "long part: bench/compare.py ${args[*]} --budget $budget"
  # a hard stop 30 s past the time box (8 minutes in all by default): a point far over its estimate
  # cannot hold the machine; the records so far are in long.json already
  timeout $((budget + 30)) "$PYTHON" bench/compare.py "${args[@]}" --budget "$budget" \
    --out "$OUT/long.json" --md "$OUT/long.md"
}

smoke() {
  local failed=()
  setup
  import_check || { echo "SMOKE FAILED: imports (see above); nothing else can run"; return 1; }
  say "pi-lora train + eval on a tiny model"
  cli_check || failed+=("pi-lora train/eval")
  if has_cuda; then
    say "bench/compare.py on a tiny model, on CUDA"
    "$PYTHON" bench/compare.py --device cuda --tiny --steps 1 --out "$OUT/smoke-compare.json" || failed+=("compare.py on CUDA")
    say "layer split (model.gpus): cuda:0 + cpu against cuda:0 alone"
    "$PYTHON" bench/gpu_split.py --out "$OUT/gpu_split.json" 2>&1 | grep -v "Writing model" || failed+=("gpu_split.py")
  else
    say "no CUDA here: the CPU versions"
    "$PYTHON" bench/compare.py --device cpu --tiny --steps 1 --out "$OUT/smoke-compare.json" || failed+=("compare.py on CPU")
    "$PYTHON" bench/gpu_split.py --devices cpu,cpu --length 1024 --out "$OUT/gpu_split.json" 2>&1 \
      | grep -v "Writing model" || failed+=("gpu_split.py")
  fi
  if [ ${#failed[@]} = 0 ]; then
    echo "SMOKE OK (+${SECONDS}s)"
  else
    local IFS=';'
    echo "SMOKE FAILED: ${failed[*]} (+${SECONDS}s)"
    return 1
  fi
}

# --- SmolLM2 -----------------------------------------------------------------------------------------

part_smollm2() {
  if ! has_cuda; then
    say "SmolLM2 part: skipped (it trains at 32k tokens: a GPU's job)"
    return 0
  fi
  local target=${SM_TARGET:-32768} runs=eval/smollm2-gpu logs=eval/smollm2-gpu-logs
  [ -f .gpu/smollm2.gguf ] && export GGUF=$REPO/.gpu/smollm2.gguf
  if [ -f .gpu/kjv-books.jsonl.gz ] && [ -z "${KJV:-}" ]; then
    gunzip -c .gpu/kjv-books.jsonl.gz > "$OUT/kjv-books.jsonl"
    export KJV=$OUT/kjv-books.jsonl
  fi
  export LENGTHS=${SM_LENGTHS:-2048,4096,8192,16384,32768} STRIDE=${SM_STRIDE:-256} WINDOWS=1
  export DEPTHS=${SM_DEPTHS:-8} TRIALS=${SM_TRIALS:-3} PASSKEY=${SM_PASSKEY:-1} TARGET=$target
  rm -rf "$runs" "$logs"
  mkdir -p "$logs"
  say "SmolLM2 part: base evaluations (PI x4, no PI), then training ${SM_STEPS:-300} steps, then its evaluation"
  OUT=$runs ROPES="linear:4 none" TRAIN=1 STEPS=${SM_STEPS:-300} ACCUM=${SM_ACCUM:-1} LR=${SM_LR:-2e-4} \
    bash bench/smollm2_pi.sh 2>&1 | tee "$logs/smollm2_pi.log"
  report_smollm2 "$runs" "$logs" "$runs/run-$target"
}

report_smollm2() {
  local runs=$1 logs=$2 run=$3
  {
    echo "### SmolLM2-135M, PI 8,192 -> ${TARGET} (GPU: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'), $(date +%F))"
    echo
    local passkey="no passkey"
    [ "$PASSKEY" = 1 ] && passkey="passkey at the longest length, $DEPTHS positions x $TRIALS trials"
    echo "Settings: perplexity by sliding window at $LENGTHS (stride $STRIDE, one window at the longest length,"
    echo "the first ${LENGTHS##*,} tokens of the New Testament); $passkey. Training: \`pi-lora train\` on the Old"
    echo "Testament, $TARGET tokens x batch 1 x accum ${SM_ACCUM:-1}, lr ${SM_LR:-2e-4}, ${SM_STEPS:-300} steps, LoRA r=8"
    echo "q/k/v/o + embed/norm, NF4. Command: \`bash bench/gpu.sh smollm2\` (bench/smollm2_pi.sh)."
    echo
    "$PYTHON" - "$run" <<'PY' || true
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
m = run / "metrics.jsonl"
rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.is_file() else []
if not rows:
    print("Training: no step completed."); sys.exit()
tps = statistics.median(r["tokens_per_s"] for r in rows)
first, last = rows[0], rows[-1]
k = max(1, len(rows) // 10)
head = statistics.mean(r["loss"] for r in rows[:k]); tail = statistics.mean(r["loss"] for r in rows[-k:])
print(f"Training: {last['step']} steps ({last['tokens']:,} tokens); loss {first['loss']:.3f} at step 1, "
      f"mean {head:.3f} over the first {k} steps and {tail:.3f} over the last {k}; median {tps:,.0f} tokens/s; "
      f"peak memory {max(r['mem_gib'] for r in rows):.2f} GiB; adapter {'written' if (run / 'adapter').is_dir() else 'MISSING'}.")
PY
    echo
    local results
    results=$(ls "$runs"/base-linear-4/results.json "$runs"/base-none/results.json "$runs"/trained/results.json 2>/dev/null || true)
    if [ -n "$results" ]; then
      # shellcheck disable=SC2086
      "$PYTHON" bench/results_table.py $results || true
    else
      echo "(no evaluation results)"
    fi
  } > "$OUT/smollm2-tables.md" 2>&1
  cat "$OUT/smollm2-tables.md"
  tar czf "$OUT/smollm2.tar.gz" --exclude='adapter' --exclude='checkpoints' --exclude='kjv-*.jsonl' \
    "$runs" "$logs" 2>/dev/null || true
  say "SmolLM2 files: $OUT/smollm2-tables.md, $OUT/smollm2.tar.gz"
}

main() {
  local rc=0
  case "$PART" in
    smoke) smoke || rc=1 ;;
    7b) setup && part_7b || rc=1 ;;
    long) setup && part_long || rc=1 ;;
    smollm2) setup && part_smollm2 || rc=1 ;;
    full) setup || return 1; part_7b || { rc=1; say "7B part failed"; }; part_smollm2 || rc=1 ;;
    *) echo "usage: bash bench/gpu.sh smoke|7b|long|smollm2|full" >&2; exit 2 ;;
  esac
  say "$([ $rc = 0 ] && echo done || echo FAILED): $PART"
  return $rc
}

main 2>&1 | tee "$OUT/gpu-$PART.log"

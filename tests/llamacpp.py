"""Build llama.cpp's `llama-tokenize` and `llama-perplexity` from the llama-cpp-python sdist.

The sdist (downloaded by .ci/run into .cache/llamacpp/) vendors a llama.cpp source tree; the
GGUF tests run the real llama.cpp on pi-lora's exports, since only llama.cpp itself can say how
llama.cpp reads a file. The build is CPU-only, static, portable (no -march=native) and only the two
tools, about 11 minutes on 2 cores the first time; it lives in .cache/llamacpp/build-<key>/ where
the key hashes the sdist and the cmake flags, so it is reused while neither changes.

Run `python tests/llamacpp.py` to build ahead of the tests (it prints the bin folder).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "llamacpp"
TARGETS = ("llama-tokenize", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)


def sdist() -> Path | None:
    """The newest downloaded llama-cpp-python sdist, or None when .ci/run has not fetched one."""
    found = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    return found[-1] if found else None


def build_key(archive: Path) -> str:
    digest = hashlib.sha256(archive.read_bytes())
    digest.update("\n".join(CMAKE_FLAGS + TARGETS).encode())
    return digest.hexdigest()[:16]


def build(archive: Path, jobs: int = 2) -> Path:
    """The folder holding the two tools, built first if this sdist and these flags never were."""
    root = CACHE / f"build-{build_key(archive)}"
    bin_dir, done = root / "build" / "bin", root / "done"
    if done.exists():
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    # A lock, so that two test processes starting together build once; an interrupted build
    # resumes where it stopped (cmake is incremental) and only a finished one writes `done`.
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            source_dir = source(archive)
            subprocess.run(["cmake", "-S", str(source_dir), "-B", str(root / "build"), *CMAKE_FLAGS],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cmake", "--build", str(root / "build"), f"-j{jobs}",
                            "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
            done.write_text("\n".join(CMAKE_FLAGS) + "\n")
    return bin_dir


def extra(bin_dir: Path, target: str, jobs: int = 2) -> Path:
    """Another tool of the same build (llama-completion for `eval --engine llama.cpp`), built in its tree
    on first use: a file or two on top of the libraries already built (seconds), and the build key,
    hence the two tools above, unchanged."""
    tool = bin_dir / target
    if not tool.exists():
        with open(bin_dir.parent.parent / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not tool.exists():
                subprocess.run(["cmake", "--build", str(bin_dir.parent), f"-j{jobs}", "--target", target], check=True,
                               stdout=subprocess.DEVNULL)
    return tool


def source(archive: Path) -> Path:
    """The llama.cpp source tree the sdist vendors, unpacked once beside its build."""
    dest = CACHE / f"build-{build_key(archive)}" / "src"
    if not (dest / "ok").exists():
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        (dest / "ok").touch()
    top = next(p for p in dest.iterdir() if p.is_dir())
    return top / "vendor" / "llama.cpp"


# llama.cpp's logger writes from a thread that is never joined, so at exit the last lines (the
# result of llama-perplexity among them) are often lost on a busy machine. A library whose
# destructor waits a moment at exit gives that thread the time; nothing else changes.
LINGER_C = "#include <unistd.h>\n__attribute__((destructor)) static void linger(void) { usleep(300000); }\n"


def run(bin_dir: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    """One of the tools, its whole output captured (text)."""
    linger = bin_dir / "liblinger.so"
    if not linger.exists():
        source = bin_dir / "linger.c"
        source.write_text(LINGER_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(linger), str(source)], check=True)
    env = {**os.environ, "LD_PRELOAD": str(linger)}
    return subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, env=env)


if __name__ == "__main__":
    archive = sdist()
    if archive is None:
        sys.exit(f"no llama-cpp-python sdist in {CACHE} (see .ci/run)")
    tools = build(archive, jobs=int(os.environ.get("JOBS", "2")))
    extra(tools, "llama-completion", jobs=int(os.environ.get("JOBS", "2")))  # eval --engine llama.cpp
    print(tools)

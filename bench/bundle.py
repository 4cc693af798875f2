"""How bench/gpu_prepare.sh's bundle travels to a machine without network: copies of at most a few
tens of MiB each, the first holding everything `bash bench/gpu.sh smoke` reads, and a file too big for
one copy split in parts (PART.aa, .ab ...) that the target joins back.

    python bench/bundle.py split FILE FIRST REST   # FILE.aa of FIRST bytes, then parts of REST bytes
    du -b --max-depth=0 NAMES | python bench/bundle.py plan LIMIT [SMOKE ...]   # which copy takes what
"""

from __future__ import annotations

import sys
from pathlib import Path


def split(src: Path, first: int, rest: int) -> list[Path]:
    """src in parts beside it: .aa of `first` bytes (what fits beside the smoke's wheels), then `rest`."""
    if first <= 0 or rest <= 0:
        raise ValueError(f"part sizes must be positive: {first}, {rest}")
    parts = []
    with open(src, "rb") as f:
        for size in [first] + [rest] * 25:
            data = f.read(size)
            if not data:
                break
            parts.append(src.with_name(f"{src.name}.a{chr(ord('a') + len(parts))}"))
            parts[-1].write_bytes(data)
        if f.read(1):
            raise ValueError(f"{src} needs more than 26 parts of {rest} bytes")
    return parts


def joined(parts: list[Path], dest: Path) -> Path:
    """One file from its parts (PART.aa PART.ab ...), joined once; a single file as is."""
    if len(parts) == 1:
        return parts[0]
    size = sum(p.stat().st_size for p in parts)
    if not (dest.is_file() and dest.stat().st_size == size):
        tmp = dest.with_name(dest.name + ".tmp")
        with open(tmp, "wb") as out:
            for part in sorted(parts):
                out.write(part.read_bytes())
        tmp.replace(dest)
    return dest


def plan(sizes: dict[str, int], limit: int, smoke: set[str]) -> list[list[str]]:
    """Copies of at most `limit` bytes: the first holds every name in `smoke` (the first call runs the
    smoke, so it must find all it reads), then each other name, largest first, in the first copy with
    room for it."""
    copies: list[tuple[int, list[str]]] = [(0, [])]
    for name, size in sorted(sizes.items(), key=lambda item: (item[0] not in smoke, -item[1])):
        if size > limit:
            raise ValueError(f"{name} is {size / 2**20:.1f} MiB, over one copy of {limit / 2**20:.1f} MiB")
        i = 0 if name in smoke else next((i for i, c in enumerate(copies) if c[0] + size <= limit), None)
        if i is None:
            copies.append((0, []))
            i = len(copies) - 1
        copies[i] = (copies[i][0] + size, copies[i][1] + [name])
    if copies[0][0] > limit:
        raise ValueError(f"what the smoke reads is {copies[0][0] / 2**20:.1f} MiB, over one copy of "
                         f"{limit / 2**20:.1f} MiB")
    return [names for _, names in copies if names]


def main(argv: list[str]) -> None:
    try:
        if argv[:1] == ["split"] and len(argv) == 4:
            print(" ".join(p.name for p in split(Path(argv[1]), int(argv[2]), int(argv[3]))))
        elif argv[:1] == ["plan"] and len(argv) >= 2:
            sizes = {name.strip(): int(size) for size, name in (line.split("\t", 1) for line in sys.stdin)}
            for i, names in enumerate(plan(sizes, int(argv[1]), set(argv[2:])), 1):
                size = sum(sizes[n] for n in names)
                print(f"  copy {i}: {size / 2**20:.1f} MiB: {' '.join(names)}"
                      + (" (what bash bench/gpu.sh smoke reads)" if i == 1 else ""))
        else:
            sys.exit(__doc__)
    except ValueError as e:
        sys.exit(f"bundle: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])

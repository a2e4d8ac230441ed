"""Say once, before an image folder is decoded, what decoding will change: images converted to RGB
(grayscale, palette, RGBA, ...) and images resized to `dataset.image_size`.

Reads only each file's header (PIL opens lazily), so it costs a directory walk, not a decode.
Kept apart from datasets.py, whose decoding is being rewritten: this only looks at the files.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from PIL import Image


def folder_changes(root: Path, size: int | None, suffixes: tuple[str, ...]) -> tuple[Counter, Counter, int]:
    """(images per mode that is not RGB, images per (w, h) that is not size×size, images seen), over the
    files with `suffixes` (the decoder's IMAGE_SUFFIXES, passed in: this module does not import the decoder)."""
    modes: Counter = Counter()
    sizes: Counter = Counter()
    seen = 0
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (Path(root) / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() not in suffixes:
                    continue
                try:
                    with Image.open(f) as img:
                        mode, shape = img.mode, img.size
                except OSError:
                    continue  # the decoder reports unreadable files itself
                seen += 1
                if mode != "RGB":
                    modes[mode] += 1
                if size and shape != (size, size):
                    sizes[shape] += 1
    return modes, sizes, seen


def _listing(counts: Counter, show) -> str:
    common = counts.most_common(3)
    text = ", ".join(f"{n} {show(k)}" for k, n in common)
    return text + (f" and {sum(counts.values()) - sum(n for _, n in common)} more" if len(counts) > 3 else "")


def announce_folder_changes(root: Path, size: int | None, suffixes: tuple[str, ...]) -> list[str]:
    """Print (once, on stderr) and return the lines saying which images decoding converts or resizes."""
    modes, sizes, seen = folder_changes(root, size, suffixes)
    lines = []
    if modes:
        lines.append(f"[data] {sum(modes.values())} of {seen} images are converted to RGB "
                     f"({_listing(modes, lambda m: f'in mode {m}')}; e.g. grayscale L: its value in all 3 channels)")
    if sizes:
        lines.append(f"[data] {sum(sizes.values())} of {seen} images are resized to {size}x{size} px "
                     f"(dataset.image_size={size}, bicubic) from {_listing(sizes, lambda s: f'at {s[0]}x{s[1]}')}")
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return lines

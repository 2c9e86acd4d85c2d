#!/usr/bin/env python3
"""Rebuild inferforge/assets/sentences.txt from Debian's `fortunes` package (apt-get install fortunes).

Keeps single-paragraph, ASCII, mostly-alphabetic fortunes of 40-300 characters from the gentler
categories, de-duplicated and shuffled with a fixed seed, so the file is reproducible.
"""

import random
import re
import sys
from pathlib import Path

SOURCE = Path("/usr/share/games/fortunes")
CATEGORIES = ("art", "computers", "definitions", "education", "food", "fortunes", "humorists", "literature",
              "miscellaneous", "people", "platitudes", "science", "wisdom", "work")
OUT = Path(__file__).resolve().parent.parent / "inferforge" / "assets" / "sentences.txt"
HEADER = """\
# Real English sentences for calibration and validation, taken from the fortune files of Debian's
# `fortunes` package (categories: wisdom, literature, science, education, work, food, people, art, ...),
# one per line, shuffled with a fixed seed. The first lines calibrate, the later ones are held out.
"""


def sentences(category: str):
    text = (SOURCE / category).read_text(encoding="utf-8", errors="ignore")
    for entry in text.split("\n%\n"):
        lines = [line.strip() for line in entry.splitlines() if not line.strip().startswith("--")]
        s = re.sub(r"\s+", " ", " ".join(line for line in lines if line)).strip()
        letters = sum(c.isalpha() for c in s)
        if 40 <= len(s) <= 300 and s.isascii() and letters / len(s) > 0.7 and not re.search(r"[<>|\\{}_=]", s):
            yield s


def main(count: int = 480) -> None:
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} not found: apt-get install fortunes")
    pool = sorted({s for c in CATEGORIES for s in sentences(c)})
    random.Random(0).shuffle(pool)
    OUT.write_text(HEADER + "\n".join(pool[:count]) + "\n")
    print(f"wrote {min(count, len(pool))} sentences to {OUT}")


if __name__ == "__main__":
    main()

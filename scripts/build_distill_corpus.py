#!/usr/bin/env python3
"""Build the training text of examples/distill-minilm.yaml from Debian packages (run once).

    apt-get install -y fortunes python3-doc
    python scripts/build_distill_corpus.py

Writes examples/data/fortunes.txt (fortunes, filtered as scripts/build_demo_sentences.py does) and
examples/data/python-docs.txt (prose sentences of the Python library reference, as
scripts/extract_python_docs.py extracts them), one text per line, shuffled with a fixed seed. Texts
that the project validates on (inferforge/assets/sentences.txt, tests/data/python_docs.txt) are left
out, so a model distilled on this text is never validated on text it was trained on. Licenses: the
fortune files as Debian ships them; the Python documentation under the PSF License Agreement.
"""

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_demo_sentences as fortunes  # noqa: E402
import extract_python_docs as docs  # noqa: E402

OUT = ROOT / "examples" / "data"
FORTUNES, DOCS = 4000, 3000


def _validation_texts() -> set[str]:
    lines = (ROOT / "inferforge" / "assets" / "sentences.txt").read_text().splitlines()
    lines += (ROOT / "tests" / "data" / "python_docs.txt").read_text().splitlines()
    return {line.strip() for line in lines}


def main() -> None:
    if not fortunes.SOURCE.is_dir() or not docs.SOURCES.is_dir():
        sys.exit("needs /usr/share/games/fortunes and python3-doc: apt-get install -y fortunes python3-doc")
    banned = _validation_texts()
    pool = sorted({s for c in fortunes.CATEGORIES for s in fortunes.sentences(c)} - banned)
    random.Random(1).shuffle(pool)
    found = []
    for path in sorted(docs.SOURCES.glob("*.rst.txt")):
        for paragraph in docs.prose_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            found.extend(docs.sentences(paragraph))
    found = sorted(set(found) - banned)
    random.Random(1).shuffle(found)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fortunes.txt").write_text("\n".join(pool[:FORTUNES]) + "\n")
    (OUT / "python-docs.txt").write_text("\n".join(found[:DOCS]) + "\n")
    print(f"wrote {min(len(pool), FORTUNES)} fortunes and {min(len(found), DOCS)} documentation sentences to {OUT}")


if __name__ == "__main__":
    main()

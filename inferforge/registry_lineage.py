"""Lineage: the chain of artifacts a registered version was made from, back to its source checkpoint.

A derived artifact's manifest names its parent: `parent` at the top level (what `quantize --onnx`
writes) or `provenance.parent` (recalibration), each a record with the parent's content `version`,
`name`, `path` and `manifest_sha256`. Each parent is looked up by that content version among the
registered versions (any name); a parent that was never registered is followed through its recorded
path when a manifest is still there, and otherwise shown with what its child recorded. The walk ends
at the first artifact with no parent: its `source` (the checkpoint it was exported or quantized from,
with the sha256 of its weights) is the root.

A node: {name, content, registered: [refs], path, kind, created, steps, gates, data, parent_record,
parent: node | None, source: {...} | None, note}. `gates` holds the manifest's `checks` (each with
name, measured/op/limit or limits, passed) plus `validation` and the LM `gate` record; `data` every
`*_sha256` of the data the step used (calibration, held-out, drift windows), by dotted key.
"""

from __future__ import annotations

from pathlib import Path

from inferforge.errors import ArtifactError
from inferforge.manifest import read_manifest

MAX_DEPTH = 64
# Hashes that identify files or models, not data sets; everything else named *_sha256 is data.
_NOT_DATA = {"manifest_sha256", "model_sha256", "weights_sha256", "sha256"}
_SKIP_SECTIONS = {"files", "parent", "provenance", "source", "environment", "recipe", "format"}


def parent_record(manifest: dict) -> dict | None:
    """The parent record of a derived artifact's manifest, or None for one made from a checkpoint."""
    provenance = manifest.get("provenance")
    record = provenance.get("parent") if isinstance(provenance, dict) else None
    record = record or manifest.get("parent")
    return record if isinstance(record, dict) else None


def data_hashes(manifest: dict) -> dict[str, str]:
    """Every `*_sha256` of the data an artifact's step used, by dotted key (e.g. quantization.calibration_sha256)."""
    found: dict[str, str] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if not prefix and key in _SKIP_SECTIONS:
                    continue
                dotted = f"{prefix}.{key}" if prefix else key
                if isinstance(inner, str) and key.endswith("_sha256") and key not in _NOT_DATA:
                    found.setdefault(dotted, inner)
                else:
                    walk(inner, dotted)

    walk(manifest, "")
    provenance = manifest.get("provenance")
    if isinstance(provenance, dict):   # recalibration keeps its data records beside the parent
        walk({k: v for k, v in provenance.items() if k != "parent"}, "provenance")
    return found


def _node(manifest: dict, *, registered: list[str], path: str | None, note: str | None = None) -> dict:
    return {"name": manifest.get("name"), "content": manifest.get("version"), "registered": registered,
            "path": path, "kind": manifest.get("kind"), "created": manifest.get("created"),
            "steps": [s.get("name") for s in manifest.get("steps") or [] if isinstance(s, dict)],
            "gates": {"checks": manifest.get("checks") or [], "validation": manifest.get("validation"),
                      "gate": manifest.get("gate")},
            "accuracy_passed": manifest.get("accuracy_passed"), "data": data_hashes(manifest),
            "parent_record": parent_record(manifest), "parent": None, "source": None, "note": note}


def lineage(registry, version) -> dict:
    """The lineage tree of the registered `version` (a `registry.Version`); see the module docstring."""
    try:
        manifest = read_manifest(version.path)
        note = None
    except ArtifactError as e:
        manifest, note = {"name": version.artifact_name, "version": version.content, "kind": version.kind}, str(e)
    refs = [v.ref for v in registry.find_content(version.content)]
    root = _node(manifest, registered=refs, path=str(version.path), note=note)
    node, seen = root, {version.content}
    for _ in range(MAX_DEPTH):
        record = node["parent_record"]
        if record is None:
            node["source"] = manifest.get("source")
            break
        manifest, parent = _parent(registry, record)
        if parent["content"] in seen:
            parent["note"] = "a cycle: this artifact is already above in the lineage; stopped"
            node["parent"] = parent
            break
        seen.add(parent["content"])
        node["parent"] = parent
        node = parent
    return root


def _parent(registry, record: dict) -> tuple[dict, dict]:
    """The parent's manifest and node: from the registry by content version, else from its recorded path."""
    content = record.get("version")
    stored = registry.find_content(content) if content else []
    if stored:
        try:
            manifest = read_manifest(stored[0].path)
            return manifest, _node(manifest, registered=[v.ref for v in stored], path=str(stored[0].path))
        except ArtifactError as e:
            broken = {"name": record.get("name"), "version": content}
            return broken, _node(broken, registered=[v.ref for v in stored], path=str(stored[0].path), note=str(e))
    path = record.get("path")
    if path and Path(path, "manifest.json").is_file():
        try:
            manifest = read_manifest(path)
        except ArtifactError as e:
            manifest = None
            note = str(e)
        if manifest is not None and manifest.get("version") == content:
            return manifest, _node(manifest, registered=[], path=path, note="not registered; read from its recorded path")
        if manifest is not None:
            note = f"not registered; {path} now holds another artifact (content {manifest.get('version')})"
    else:
        note = "not registered, and its recorded path holds no artifact; shown as its child recorded it"
    known = {"name": record.get("name"), "version": content}
    return known, _node(known, registered=[], path=path, note=note)


def render(tree: dict) -> list[str]:
    """The lineage tree as text lines: the artifact first, each parent indented below it, the source last."""
    lines: list[str] = []
    node, depth = tree, 0
    while node is not None:
        pad = "   " * depth + ("└─ " if depth else "")
        inner = "   " * depth + ("   " if depth else "")
        where = ", ".join(node["registered"]) or "not registered"
        lines.append(f"{pad}{node['name'] or '?'}  content {node['content'] or '?'}  [{where}]  "
                     f"{node['kind'] or ''}  {node['created'] or ''}".rstrip())
        if node["steps"]:
            lines.append(f"{inner}steps: {', '.join(node['steps'])}")
        for check in node["gates"]["checks"]:
            lines.append(f"{inner}gate {check_text(check)}")
        if node["gates"]["gate"] and isinstance(node["gates"]["gate"], dict):
            lines.append(f"{inner}gate: {node['gates']['gate'].get('note', '')}")
        for key, value in node["data"].items():
            lines.append(f"{inner}data {key} {value[:16]}")
        if node["note"]:
            lines.append(f"{inner}note: {node['note']}")
        if node["parent"] is None and node["source"]:
            src = node["source"]
            lines.append(f"{'   ' * (depth + 1)}└─ source checkpoint {src.get('model')}  weights sha256 "
                         f"{str(src.get('weights_sha256'))[:16]}")
        node, depth = node["parent"], depth + 1
    return lines


def check_text(check: dict) -> str:
    result = "PASS" if check.get("passed") else "FAIL"
    if "measured" in check and isinstance(check.get("measured"), (int, float)):
        return f"{check.get('name')}: {check['measured']:.4g} {check.get('op', '')} {check.get('limit')} {result}"
    limits = ", ".join(f"{k} {v}" for k, v in (check.get("limits") or {}).items() if v is not None)
    return f"{check.get('name')}: {limits} {result}".replace("  ", " ")

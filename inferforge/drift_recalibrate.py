"""Close the drift loop: when new traffic drifts, re-run the artifact's own recipe with the new texts
mixed in, gate it on the old and the new distribution, and register (and promote) it only if it holds.

The mix (`mix_sizes`): the recipe's own data split is kept as it is (the same calibration sentences,
the same held-out set), and the distinct new texts that are not in it are added: the first
`calibration` of them to the calibration sentences, the next `held_out` held out as the bucket
`extra`, which calibration never sees. `held_out` is half of the new texts (at most the recipe's
held_out_size), `calibration` the rest (at most the recipe's calibration_size, so the new texts are
at most half of the calibration sentences). Every gate of the recipe is then checked per held-out
bucket: short, ordinary and long (the old distribution, exactly the parent's held-out set) and
`extra` (the new one); every latency target is re-measured by the recipe's bench step.

The child artifact's manifest records `provenance.parent` (the parent's content `version`, `name`,
`path`, `manifest_sha256`: `Registry().lineage` walks it), `provenance.recalibration` (trigger, mix,
the parent's data hashes and the new data's hashes) and holds `drift_report.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import GateFailed, RecipeError, UserInputError

MIN_NEW_TEXTS = 20
MIX_RULE = ("the recipe's own calibration and held-out sentences unchanged, plus the distinct new texts not in them: "
            "the first half (at most calibration_size) added to calibration, the rest (at most held_out_size) "
            "held out as the bucket 'extra'; every gate must hold on each held-out bucket")


@dataclass
class Recalibration:
    """What `recalibrate` did: the drift report, and when it ran, the run's result and the registered version."""

    drift: dict
    ran: bool = False
    trigger: str | None = None          # "drift" or "forced"
    result: object = None               # pipeline.RunResult
    version: object = None              # registry.Version, when registered
    registered_as: str | None = None
    promoted: str | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        result = self.result
        return {"ran": self.ran, "trigger": self.trigger, "duration_s": round(self.duration_s, 1),
                "passed": result.passed if result is not None else None,
                "artifact": str(result.output) if result is not None and result.passed else None,
                "failure_report": str(result.failure_report) if result is not None and result.failure_report else None,
                "checks": result.report["checks"] if result is not None else None,
                "registered": self.version.ref if self.version is not None else None,
                "promoted": self.promoted}


def recipe_of(artifact: Path, manifest: dict):
    """The `Recipe` that made `artifact`, from its manifest, or UserInputError saying why it cannot re-run."""
    from inferforge.recipe import recipe_from_dict

    data = manifest.get("recipe")
    if not isinstance(data, dict):
        made_by = ("`quantize --onnx` (its recipe is its parent's)" if manifest.get("parent")
                   or (manifest.get("provenance") or {}).get("parent") else "a command without a recipe")
        raise UserInputError(f"{artifact}: its manifest holds no recipe (made by {made_by}); --recalibrate re-runs "
                             "the recipe that made an artifact, so it needs an artifact of a recipe run "
                             "(`inferforge optimize`)")
    if manifest.get("kind") != "sentence-encoder":
        raise UserInputError(f"{artifact}: a {manifest.get('kind')} artifact; --recalibrate re-runs sentence-encoder "
                             "recipes (for a causal LM, re-run `inferforge quantize --config` with new --calibration)")
    try:
        return recipe_from_dict(data, source=f"{artifact}/manifest.json recipe")
    except RecipeError as e:
        raise UserInputError(f"cannot re-run the artifact's recipe: {e}") from None


def mix_sizes(recipe, new_texts: list[str]) -> tuple[int, int]:
    """(calibration, held_out) counts of new texts (see the module docstring); UserInputError if too few."""
    from inferforge.data import read_sentences

    old = set(read_sentences(recipe.data.sentences)[:recipe.data.calibration_size + recipe.data.held_out_size])
    n = len([t for t in dict.fromkeys(new_texts) if t not in old])
    if n < MIN_NEW_TEXTS:
        raise UserInputError(f"--recalibrate needs at least {MIN_NEW_TEXTS} distinct new texts (half calibrate, half "
                             f"are held out for the gate), got {n}")
    held_out = min(n // 2, recipe.data.held_out_size)
    return min(n - held_out, recipe.data.calibration_size), held_out


def recalibration_recipe(recipe, data: Path, new_calibration: int, new_held_out: int, output: Path, *,
                         min_cosine: float | None = None):
    """`recipe` re-aimed at `output` with the new texts of `data` mixed in (see `mix_sizes`)."""
    return dataclasses.replace(
        recipe, output=str(output),
        data=dataclasses.replace(recipe.data, extra_sentences=str(Path(data).resolve()),
                                 extra_calibration_size=new_calibration, extra_held_out_size=new_held_out),
        gates=recipe.gates if min_cosine is None else dataclasses.replace(recipe.gates, min_cosine=min_cosine))


def default_output(name: str) -> Path:
    return Path("runs") / f"{name}-recal-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def recalibrate(reference: str, data: str | Path, *, thresholds=None, force: bool = False, name: str | None = None,
                promote: str | None = None, output: str | Path | None = None, min_cosine: float | None = None,
                progress=None, registry=None, on_drift_report=None) -> Recalibration:
    """Check `data` (a .txt file) against the artifact `reference` (a directory or NAME@ALIAS); on drift
    (or with `force`) re-run its recipe with the new texts mixed in, write the child artifact at
    `output`, and when every gate and target holds, register it under `name` (default: the registry
    name of `reference`) and point `promote` at it. A missed gate or target raises `GateFailed`
    (the alias is unchanged, nothing registered, the reports in `OUT.failed/`); bad input raises
    `UserInputError` before any work starts. `min_cosine` overrides the recipe's gate."""
    from inferforge.data import read_sentences, sha256_lines
    from inferforge.drift_cli import read_traffic
    from inferforge.fileio import sha256_file
    from inferforge.manifest import MANIFEST_NAME, verify_artifact
    from inferforge.optimize.drift import DriftThresholds, check_drift, resolve_artifact
    from inferforge.pipeline import gate_failure_message, run_recipe
    from inferforge.progress import Progress
    from inferforge.registry_refs import check_alias, check_name, looks_like_ref, parse_ref

    progress = progress or Progress(quiet=True)
    data = Path(data)
    is_ref = looks_like_ref(str(reference)) and not Path(reference).exists()
    if promote is not None:
        check_alias(promote)
        if not is_ref and not name:
            raise UserInputError(f"--promote {promote} moves an alias in the registry: give the artifact as NAME@ALIAS "
                                 "or add --name NAME")
    if data.suffix == ".jsonl":
        raise UserInputError(f"--data {data}: --recalibrate reads .txt files (one text per line)")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UserInputError(f"--min-cosine must be between -1 and 1, got {min_cosine}")
    if name is not None:
        check_name(name)
    name = name or (parse_ref(str(reference))[0] if is_ref else None)
    if name:   # the run will register: make sure it can, before minutes of work
        from inferforge.registry import Registry

        registry = registry or Registry()
        registry.check_writable()
    artifact = resolve_artifact(reference).resolve()
    manifest = verify_artifact(artifact)
    recipe = recipe_of(artifact, manifest)
    texts = read_traffic(data)

    with progress.spinner(f"checking {len(texts)} texts for drift against {artifact.name}"):
        report = check_drift(artifact, texts, thresholds or DriftThresholds()).to_dict()
    if on_drift_report is not None:
        on_drift_report(report)
    outcome = Recalibration(drift=report)
    if not report["drift"] and not force:
        progress.print("no drift: nothing to recalibrate")
        return outcome
    new_calibration, new_held_out = mix_sizes(recipe, texts)
    outcome.ran, outcome.trigger = True, "drift" if report["drift"] else "forced"
    progress.print(f"recalibrating ({outcome.trigger}): re-running recipe {recipe.name} with {new_calibration} new "
                   f"texts in calibration and {new_held_out} held out")
    out = Path(output) if output else default_output(recipe.name)
    new_recipe = recalibration_recipe(recipe, data, new_calibration, new_held_out, out, min_cosine=min_cosine)
    distinct = read_sentences(str(data))
    provenance = {
        "parent": {"path": str(artifact), "name": manifest["name"], "version": manifest["version"],
                   "manifest_sha256": sha256_file(artifact / MANIFEST_NAME),
                   "model_sha256": manifest["files"][manifest["runtime"]["model"]]["sha256"],
                   **({"reference": str(reference)} if is_ref else {})},
        "recalibration": {
            "trigger": outcome.trigger, "mix": MIX_RULE,
            "new_calibration_texts": new_calibration, "new_held_out_texts": new_held_out,
            "drift_report": "drift_report.json", "drifted": [d["what"] for d in report["drifted"]],
            "parent_data": manifest.get("data"),
            "new_data": {"source": str(data.resolve()), "file_sha256": sha256_file(data), "texts": len(distinct),
                         "texts_sha256": sha256_lines(distinct)},
            **({"gate_override": {"min_cosine": min_cosine}} if min_cosine is not None else {}),
        },
    }
    started = time.perf_counter()
    result = run_recipe(new_recipe, progress=progress, provenance=provenance,
                        files={"drift_report.json": json.dumps(report, indent=1) + "\n"})
    outcome.result, outcome.duration_s = result, time.perf_counter() - started
    if not result.passed:
        alias = f"; {name}@{promote} is unchanged" if promote else ""
        raise GateFailed(gate_failure_message(result) + f"; nothing registered{alias}",
                         report_dir=str(result.failure_report))
    if name:
        outcome.version = registry.add(result.output, name, alias=promote)
        outcome.registered_as, outcome.promoted = name, promote
    return outcome

"""Recipes: what to optimize, how, and what "good enough" means, as frozen, self-validating dataclasses.

A recipe is YAML::

    name: minilm-int8
    model: all-MiniLM-L6-v2        # the demo model, a local Hugging Face directory, or module:function
    data: {sentences: demo, calibration_size: 160, held_out_size: 320}
    steps:
      - export: {opset: 17}
      - quantize: {per_channel: true, smoothquant_alpha: auto}
      - validate
      - bench: {batch_sizes: [1, 8], seq_len: 128}
    gates: {min_cosine: 0.99}
    targets: {latency: [{batch_size: 8, percentile: p95, max_ms: 100}], min_speedup: 1.5}
    output: runs/minilm-int8

A causal LM (a local Llama / Mistral / Qwen2 directory) takes one step, `quantize` with a `config`
(the formats of `inferforge quantize --config`); the `config` key is what selects this form::

    model: checkpoints/llama             # name defaults to the output directory's name
    output: runs/llama-int4
    steps:
      - quantize:
          config: int4-awq
          calibration: data/calib.txt    # .txt (one text per line) or .jsonl
          num_samples: 64
          seq_len: 256
          skip: [lm_head]
          auto_skip: true
          gate: {max_ppl_increase: 2%, min_top1_agreement: 0.9}   # or leave out: the format's default; none: off
          max_float_share: 50%           # fail when more layers than this stay in float

`load_recipe` validates everything before any work starts: unknown keys (with a suggestion for a
misspelling), wrong types, bad values and missing files raise one `RecipeError` naming the key and,
where YAML gives it, the line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from inferforge.errors import RecipeError

PERCENTILES = ("p50", "p90", "p95", "p99")
BENCH_PROVIDERS = ("pytorch-fp32", "onnx-fp32", "onnx-int8")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class Fraction(float):
    """An annotation for shares: a number (0.02) or a percentage string ('2%'); parsed to a plain float."""


@dataclass(frozen=True)
class DataConfig:
    """Text for calibration and validation: `demo` (shipped English sentences) or a text file, one per line.

    `extra_sentences` (a second text file, e.g. new traffic for a recalibration) mixes in a second
    distribution: its first `extra_calibration_size` distinct lines are added to the calibration
    sentences, the next `extra_held_out_size` are held out as their own bucket `extra`, which the
    gate checks like every length bucket. The `sentences` split is unchanged by it."""

    sentences: str = "demo"
    calibration_size: int = 160
    held_out_size: int = 320
    max_length: int | None = None     # tokens per input; None: the source model's own limit
    extra_sentences: str | None = None
    extra_calibration_size: int = 0
    extra_held_out_size: int = 0

    def __post_init__(self):
        _require(self.calibration_size >= 1, "calibration_size must be >= 1")
        _require(self.held_out_size >= 1, "held_out_size must be >= 1")
        if self.extra_sentences is None:
            _require(self.extra_calibration_size == 0 and self.extra_held_out_size == 0,
                     "extra_calibration_size and extra_held_out_size need extra_sentences (a text file)")
        else:
            _require(self.extra_calibration_size >= 1, "extra_calibration_size must be >= 1 with extra_sentences")
            _require(self.extra_held_out_size >= 1, "extra_held_out_size must be >= 1 with extra_sentences (the "
                                                    "gate must also hold on held-out text of the extra data)")
        _require(self.max_length is None or 1 <= self.max_length <= 8192, "max_length must be between 1 and 8192")


@dataclass(frozen=True)
class ExportConfig:
    """Export to ONNX through optimum-onnx; ONNX Runtime's output must match PyTorch within `atol`."""

    opset: int = 17
    atol: float = 1e-4

    def __post_init__(self):
        _require(11 <= self.opset <= 21, "opset must be between 11 and 21")
        _require(self.atol > 0, "atol must be > 0")


@dataclass(frozen=True)
class QuantizeConfig:
    """Int8 quantization with ONNX Runtime: per-channel weights, dynamic activations, SmoothQuant from calibration.

    `smoothquant_alpha` is a number in [0, 1], `auto` (pick the best of `alpha_grid` on the calibration
    set) or `off`. `smoothquant_scope`: `norm` smooths the MatMuls fed by a LayerNorm (Q/K/V, the MLP's
    first projection), `all` every weighted MatMul, also the attention output and the MLP's second
    projection (dynamic-int8 only). `exclude_nodes` keeps the named ONNX nodes in float. `embeddings: int8` also stores
    the word-embedding table as int8 with one scale per row (dynamic-int8 only; about a quarter of the
    table's size, see `inferforge.optimize.embedding_quant`).
    """

    method: str = "dynamic-int8"          # or "static-qdq" (TensorRT-style symmetric QDQ, calibrated)
    calibrate_method: str = "minmax"      # static-qdq: minmax, entropy or percentile
    per_channel: bool = True
    smoothquant_alpha: float | str = "auto"
    alpha_grid: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    smoothquant_scope: str = "norm"       # or "all"
    exclude_nodes: tuple[str, ...] = ()
    max_auto_excluded: int | None = None  # None: 2 for dynamic-int8 (speed), 16 for static-qdq (accuracy)
    calibration_margin: float = 0.003
    embeddings: str = "float"             # or "int8": the word-embedding table too

    @property
    def auto_exclusion_bound(self) -> int:
        if self.max_auto_excluded is not None:
            return self.max_auto_excluded
        return 16 if self.method == "static-qdq" else 2

    def __post_init__(self):
        _require(self.max_auto_excluded is None or self.max_auto_excluded >= 0, "max_auto_excluded must be >= 0")
        _require(0 <= self.calibration_margin < 1, "calibration_margin must be in [0, 1)")
        _require(self.method in ("dynamic-int8", "static-qdq"), "method must be 'dynamic-int8' or 'static-qdq'")
        _require(self.calibrate_method in ("minmax", "entropy", "percentile"),
                 "calibrate_method must be 'minmax', 'entropy' or 'percentile'")
        _require(self.embeddings in ("float", "int8"), "embeddings must be 'float' or 'int8'")
        _require(self.smoothquant_scope in ("norm", "all"),
                 f"smoothquant_scope must be 'norm' or 'all', got {self.smoothquant_scope!r}")
        _require(self.smoothquant_scope == "norm" or self.method == "dynamic-int8",
                 "smoothquant_scope: all is implemented for method dynamic-int8; static-qdq smooths the "
                 "LayerNorm-fed MatMuls only, drop smoothquant_scope or use method dynamic-int8")
        _require(self.embeddings == "float" or self.method == "dynamic-int8",
                 "embeddings: int8 is implemented for method dynamic-int8 (CPU serving); static-qdq models keep "
                 "float embeddings, drop 'embeddings' or use method dynamic-int8")
        a = self.smoothquant_alpha
        if isinstance(a, str):
            _require(a in ("auto", "off"), "smoothquant_alpha must be a number in [0, 1], 'auto' or 'off'")
        else:
            _require(0.0 <= a <= 1.0, "smoothquant_alpha must be a number in [0, 1], 'auto' or 'off'")
        _require(len(self.alpha_grid) > 0 and all(0 <= x <= 1 for x in self.alpha_grid),
                 "alpha_grid must be a non-empty list of numbers in [0, 1]")


class _FormatDefault:
    """A gate limit not written in the recipe: the format's default (`LMGate.default`) fills it in."""

    def __repr__(self):
        return "DEFAULT"

    def __deepcopy__(self, memo):   # one instance, so `is DEFAULT` holds after dataclasses.asdict
        return self


DEFAULT = _FormatDefault()


@dataclass(frozen=True)
class LMGateConfig:
    """Limits on the held-out comparison of the quantized causal LM with the original (see `LMGate`).

    A limit left out takes the format's default (max_ppl_increase, min_top1_agreement); `null`
    turns that one limit off."""

    max_ppl_increase: Fraction | None = DEFAULT   # 0.02 or '2%': perplexity may rise by at most 2%
    min_top1_agreement: Fraction | None = DEFAULT  # 0.9 or '90%': share of positions with the same argmax
    max_kl: float | None = None                   # mean KL(original || quantized) per token

    def __post_init__(self):
        _require(any(v is not None for v in dataclasses.astuple(self)),
                 "gate needs at least one of max_ppl_increase, min_top1_agreement, max_kl; to turn the gate off "
                 "write gate: none")
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not DEFAULT}
        _require("max_ppl_increase" not in given or 0 <= given["max_ppl_increase"] <= 1,
                 "max_ppl_increase must be between 0 and 1 (a share: 0.02 or '2%' allows +2% perplexity)")
        _require("min_top1_agreement" not in given or 0 <= given["min_top1_agreement"] <= 1,
                 "min_top1_agreement must be between 0 and 1 (0.9 or '90%')")
        _require("max_kl" not in given or given["max_kl"] >= 0, "max_kl must be >= 0")

    def with_defaults(self, fmt: str) -> LMGateConfig:
        """The limits left out filled in with `fmt`'s defaults."""
        from inferforge.optimize.lm_eval import LMGate

        default = LMGate.default(fmt)
        return dataclasses.replace(self, **{k: getattr(default, k) for k in ("max_ppl_increase", "min_top1_agreement")
                                            if getattr(self, k) is DEFAULT})


@dataclass(frozen=True)
class LLMQuantizeConfig:
    """Quantize a causal LM in PyTorch, as `inferforge quantize MODEL --config FORMAT` does.

    The first `num_samples` sequences of `seq_len` tokens from `calibration` calibrate, the next
    `num_samples // 2` are held out for the metrics and the `gate`; `auto_skip` keeps the most
    sensitive layers in float until the gate passes; `skip` patterns (fnmatch) stay in float.
    The gate is on by default with the format's limits (`LMGate.default`); a `gate` mapping sets
    limits (the ones left out keep their defaults), and only `gate: none` turns it off. A run that
    keeps more than `max_float_share` of the linear layers in float fails.
    """

    config: str
    calibration: str | None = None
    num_samples: int = 16
    seq_len: int = 128
    skip: tuple[str, ...] = ()
    auto_skip: bool = False
    group_size: int = 128
    gate: None | LMGateConfig | str = "default"   # None first: `gate: null` is refused, not read as {}
    max_float_share: Fraction = 0.5
    min_speedup: float | None = None     # speed gate: at least this many times faster than bf16 (CUDA GPU)
    at_batch: int | None = None          # ... at this many sequences per decode step (default 1)

    def __post_init__(self):
        from inferforge.optimize.llm_quantize import CALIBRATED_FORMATS, FORMATS

        _require(self.at_batch is None or self.min_speedup is not None,
                 "at_batch sets the batch size of the speed gate; add min_speedup (e.g. 1.2) or drop at_batch")
        if self.min_speedup is not None:
            from inferforge.errors import UserInputError
            from inferforge.optimize.speed_gate import SpeedGate

            try:
                SpeedGate(self.min_speedup, 1 if self.at_batch is None else self.at_batch)
            except UserInputError as e:
                raise ValueError(str(e)) from None

        _require(self.config in FORMATS, f"config {self.config!r} is not a format; choose one of {', '.join(FORMATS)}")
        _require(self.num_samples >= 1, "num_samples must be >= 1")
        _require(self.seq_len >= 2, "seq_len must be >= 2 (the metrics predict each next token)")
        _require(self.group_size >= 1, "group_size must be >= 1")
        _require(0 <= self.max_float_share <= 1, "max_float_share must be between 0 and 1 (0.5 or '50%')")
        _require(self.gate is not None, "gate must not be null (ambiguous): leave gate out for the default gate, or "
                                        "write gate: none to turn it off")
        _require(not isinstance(self.gate, str) or self.gate in ("default", "none"),
                 f"gate must be a mapping of limits, 'default' or 'none' (off), got {self.gate!r}")
        if self.gate == "default":
            object.__setattr__(self, "gate", LMGateConfig())
        if isinstance(self.gate, LMGateConfig):
            object.__setattr__(self, "gate", self.gate.with_defaults(self.config))
        _require(self.config not in CALIBRATED_FORMATS or self.calibration is not None,
                 f"config {self.config} needs calibration text: add calibration: FILE (.txt or .jsonl)")
        _require(self.gate == "none" or self.calibration is not None,
                 "the gate (on by default) compares with the original on held-out text: add calibration: FILE "
                 "(.txt or .jsonl; the last third of the sequences read is held out), or write gate: none to turn "
                 "the gate off")
        _require(not self.auto_skip or self.gate != "none",
                 "auto_skip keeps layers in float until the gate passes; it cannot run with gate: none")


@dataclass(frozen=True)
class ValidateConfig:
    """Compare the optimized model with the source PyTorch model on the held-out sentences."""

    batch_size: int = 32

    def __post_init__(self):
        _require(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass(frozen=True)
class BenchConfig:
    """Latency of each provider at each batch size, at a fixed sequence length, measured interleaved.

    `compare_teacher`: after a distill step, also time the teacher (the recipe's `model`) exported to
    fp32 ONNX, as the row `teacher-onnx-fp32`, and give every row its speed-up over it
    (`speedup_vs_teacher_onnx_fp32`). Default: on when the recipe distils."""

    batch_sizes: tuple[int, ...] = (1, 8)
    seq_len: int = 128
    warmup: int = 5
    iterations: int = 30
    providers: tuple[str, ...] = BENCH_PROVIDERS
    threads: int | None = None
    compare_teacher: bool | None = None

    def __post_init__(self):
        _require(len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes),
                 "batch_sizes must be a non-empty list of integers >= 1")
        _require(self.seq_len >= 1, "seq_len must be >= 1")
        _require(self.warmup >= 0, "warmup must be >= 0")
        _require(self.iterations >= 3, "iterations must be >= 3")
        for p in self.providers:
            _require(p in BENCH_PROVIDERS, f"unknown provider {p!r}; choose from {', '.join(BENCH_PROVIDERS)}")
        _require(self.threads is None or self.threads >= 1, "threads must be >= 1")


@dataclass(frozen=True)
class Gates:
    """Accuracy gates on the held-out set: mean-pooled embedding cosine similarity with the source model."""

    min_cosine: float = 0.99
    mean_cosine: float | None = None

    def __post_init__(self):
        _require(-1.0 <= self.min_cosine <= 1.0, "min_cosine must be between -1 and 1")
        _require(self.mean_cosine is None or -1.0 <= self.mean_cosine <= 1.0, "mean_cosine must be between -1 and 1")


@dataclass(frozen=True)
class LatencyTarget:
    """A latency SLO for the optimized model: `percentile` latency at `batch_size` at most `max_ms`."""

    batch_size: int
    max_ms: float
    percentile: str = "p95"

    def __post_init__(self):
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.max_ms > 0, "max_ms must be > 0")
        _require(self.percentile in PERCENTILES, f"percentile must be one of {', '.join(PERCENTILES)}")


@dataclass(frozen=True)
class Targets:
    """Latency targets; `min_speedup` is the optimized model's p50 speedup over ONNX fp32 at `speedup_batch_size`."""

    latency: tuple[LatencyTarget, ...] = ()
    min_speedup: float | None = None
    speedup_batch_size: int = 8

    def __post_init__(self):
        _require(self.min_speedup is None or self.min_speedup > 0, "min_speedup must be > 0")


@dataclass(frozen=True)
class DistillStepConfig:
    """Distil the recipe's model (the teacher) into a smaller student first; the later steps (export,
    quantize, validate, bench) work on the student, and validate compares it with the teacher.

    `data`: training text files (.txt, one passage per line, or .jsonl); the recipe's held-out
    validation texts are removed from them. `student`: a directory with the student's config.json,
    or leave it out and give `layers` (a list or 'every-other') or `num_layers`. The other keys are
    those of `inferforge.optimize.distill.DistillConfig` (`inferforge distill --help`); `min_mean_cosine`
    and `min_cosine` gate the student on the distillation's own held-out split. Checkpoints go to
    `OUTPUT.checkpoints/`; a re-run of the recipe continues from them."""

    data: tuple[str, ...]
    student: str | None = None
    layers: tuple[int, ...] | str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_share: Fraction = 0.1
    max_minutes: float | None = None
    lr_schedule: str = "steps"
    eval_every: int = 50
    save_every: int = 50
    held_out_share: Fraction = 0.1
    max_length: int | None = None
    group_by_length: bool = True
    cache_teacher: bool = False
    freeze_embeddings: bool = False
    freeze_layers: tuple[int, ...] = ()
    dropout: float | None = None
    length_mix: bool = False
    precision: str = "auto"
    seed: int = 0
    embedding_loss: str = "cosine"
    embedding_weight: float = 1.0
    hidden_weight: float | None = None
    hidden_loss: str = "mse"
    hidden_layers: str = "all"
    target_mean_cosine: float | None = None
    min_mean_cosine: float | None = None
    min_cosine: float | None = None

    def __post_init__(self):
        _require(len(self.data) > 0, "data must list at least one text file (.txt or .jsonl)")
        _require(self.student is not None or self.layers is not None or self.num_layers is not None,
                 "layers (a list or 'every-other'), num_layers or student is needed to build the student")
        self.distill_config()   # DistillConfig validates the rest

    def distill_config(self):
        from inferforge.optimize.distill import DistillConfig

        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("data", "student")}
        return DistillConfig(**settings)


# Step name -> config type. The pipeline looks runners up by config type.
STEP_CONFIGS: dict[str, type] = {
    "distill": DistillStepConfig,
    "export": ExportConfig,
    "quantize": QuantizeConfig,
    "validate": ValidateConfig,
    "bench": BenchConfig,
}
# Step name -> {selecting key: config type}: a step written with that key takes the other form.
STEP_FORMS: dict[str, dict[str, type]] = {"quantize": {"config": LLMQuantizeConfig}}
STEP_NAMES = {cls: name for name, cls in STEP_CONFIGS.items()} | {
    cls: name for name, forms in STEP_FORMS.items() for cls in forms.values()}
# How an error names each form of a step, so a key of the other form gets a pointed message.
FORM_NAMES = {QuantizeConfig: "the ONNX int8 quantize step (written without 'config')",
              LLMQuantizeConfig: "the causal-LM quantize step (selected by 'config: FORMAT')"}
# Top-level keys of the encoder path, and what a causal-LM recipe uses instead.
ENCODER_ONLY_KEYS = {
    "data": "the causal-LM quantize step reads its text from 'calibration'",
    "gates": "a causal-LM recipe sets its gate in the quantize step: gate: {max_ppl_increase: 2%, min_top1_agreement: 0.9}",
    "targets": "latency targets need the bench step, which a causal-LM recipe does not have",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    steps: tuple[Any, ...]
    data: DataConfig = field(default_factory=DataConfig)
    gates: Gates = field(default_factory=Gates)
    targets: Targets = field(default_factory=Targets)
    output: str = ""
    # `model` as the recipe file wrote it, before relative paths were resolved; what reports show,
    # so that they do not carry the directories of the machine that made them. Not a recipe key.
    model_as_written: str = field(default="", compare=False, repr=False)

    def __post_init__(self):
        _require(bool(self.name.strip()), "name must not be empty")
        _require(len(self.steps) > 0, "steps must list at least one step")
        kinds = [type(s) for s in self.steps]
        if LLMQuantizeConfig in kinds:
            _require(kinds == [LLMQuantizeConfig],
                     "a causal-LM recipe (quantize with 'config') has the one step 'quantize', which validates on "
                     "held-out text itself; export, validate and bench belong to the ONNX encoder path")
            return
        _require(DistillStepConfig not in kinds[1:], "distill must be the first step (the later steps work on the student)")
        first = 1 if kinds[0] is DistillStepConfig else 0
        _require(len(kinds) > first and kinds[first] is ExportConfig,
                 "the first step must be 'export' (every later step works on the ONNX model), or 'distill' "
                 "followed by 'export'")
        _require(len(set(kinds)) == len(kinds), "each step may appear once")
        if BenchConfig in kinds:
            bench = self.steps[kinds.index(BenchConfig)]
            _require(not bench.compare_teacher or DistillStepConfig in kinds,
                     "bench compare_teacher needs a distill step first (the teacher is the model it distils)")
            for t in self.targets.latency:
                _require(t.batch_size in bench.batch_sizes,
                         f"targets.latency asks for batch_size {t.batch_size}, which the bench step does not "
                         f"measure (batch_sizes {list(bench.batch_sizes)})")
            if self.targets.min_speedup is not None:
                _require(self.targets.speedup_batch_size in bench.batch_sizes,
                         f"targets.speedup_batch_size {self.targets.speedup_batch_size} is not in the bench step's batch_sizes")

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    @property
    def kind(self) -> str:
        """'causal-lm' (one PyTorch quantize step) or 'sentence-encoder' (the ONNX path)."""
        return "causal-lm" if isinstance(self.steps[0], LLMQuantizeConfig) else "sentence-encoder"

    def step(self, cls: type):
        return next((s for s in self.steps if isinstance(s, cls)), None)

    def to_dict(self) -> dict:
        """The normalized recipe: every default filled in, as written to the manifest."""
        d = dataclasses.asdict(self)
        del d["model_as_written"]
        d["steps"] = [{STEP_NAMES[type(s)]: dataclasses.asdict(s)} for s in self.steps]
        d["output"] = str(self.output_dir)
        if self.data.extra_sentences is None:   # manifests of ordinary runs keep their shape
            for key in ("extra_sentences", "extra_calibration_size", "extra_held_out_size"):
                del d["data"][key]
        if self.kind == "causal-lm":
            for key in ENCODER_ONLY_KEYS:
                del d[key]
        return json.loads(json.dumps(d))   # plain JSON types: tuples become lists


# ----------------------------------------------------------------------------------------------
# Parsing: YAML text -> plain data (with line numbers) -> typed, validated dataclasses.


class _Lines:
    """Maps a key path such as ('steps', 1, 'quantize', 'opset') to its line in the YAML file."""

    def __init__(self, node: yaml.Node | None):
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node, path):
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                self.lines[key] = k.start_mark.line + 1
                self._walk(v, key)
                self.lines[key] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, path + (i,))

    def get(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


class _Invalid(Exception):
    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", Fraction: "number or percentage such as '2%'", str: "string",
            bool: "true/false"}.get(tp, str(tp))


def _convert(tp, value, path):
    """Coerce one YAML value to the annotated type, or raise _Invalid naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        mapping_type = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
        if mapping_type is not None and isinstance(value, dict):
            return _build(mapping_type, value, path)   # its own message names the key that is wrong
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, path)
            except _Invalid:
                continue
        raise _Invalid(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, path + (i,)) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is Fraction:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                return float(value.strip()[:-1]) / 100
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _Invalid(path, f"expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key, known, path):
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return _Invalid(path + (key,), f"unknown key '{key}' ({hint})")


def _other_form_key(cls, key, path):
    """The error for a key that belongs to another form of the same step, or None."""
    if cls not in FORM_NAMES:
        return None
    for other, form in FORM_NAMES.items():
        if other is not cls and key in {f.name for f in dataclasses.fields(other)}:
            fix = f"; add config: FORMAT ({', '.join(_llm_formats())})" if other is LLMQuantizeConfig else ""
            return _Invalid(path + (key,), f"'{key}' belongs to {form}, but this is {FORM_NAMES[cls]}{fix}")
    return None


def _llm_formats() -> tuple[str, ...]:
    from inferforge.optimize.llm_quantize import FORMATS

    return FORMATS


def _build(cls, value, path):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, v in value.items():
        if key not in known:
            raise _other_form_key(cls, key, path) or _unknown_key(key, known, path)
        kwargs[key] = _convert(hints[key], v, path + (key,))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _Invalid(path, f"missing required key '{missing[0]}'")
    try:
        return cls(**kwargs)
    except ValueError as e:
        # Point at the key the message starts with, where it names one.
        first = str(e).split()[0]
        raise _Invalid(path + ((first,) if first in kwargs else ()), str(e)) from None


def _build_step(value, path):
    if isinstance(value, str):
        name, settings = value, {}
    elif isinstance(value, dict) and len(value) == 1:
        name, settings = next(iter(value.items()))
    else:
        raise _Invalid(path, "each step is a name ('validate') or a one-key mapping ('export: {opset: 17}')")
    if name not in STEP_CONFIGS:
        raise _unknown_key(name, list(STEP_CONFIGS), path)
    forms = STEP_FORMS.get(name, {}).items()
    cls = next((form for key, form in forms if isinstance(settings, dict) and key in settings), STEP_CONFIGS[name])
    return _build(cls, settings, path + (name,))


def recipe_from_dict(data: Any, *, source: str = "recipe", lines: _Lines | None = None,
                     base_dir: Path | None = None, check_paths: bool = True, resolve_output: bool = True) -> Recipe:
    """Validate plain data (as loaded from YAML) into a `Recipe`, or raise `RecipeError`.

    With `base_dir` (the recipe file's directory), relative paths are made relative to it: the
    model, the sentence and calibration files, and `output` unless `resolve_output` is False."""
    lines = lines or _Lines(None)
    try:
        if not isinstance(data, dict):
            raise _Invalid((), "a recipe is a mapping with keys name, model, steps, ...")
        known = [f.name for f in dataclasses.fields(Recipe) if f.name != "model_as_written"]
        for key in data:
            if key not in known:
                raise _unknown_key(key, known, ())
        for key in ("model", "steps"):
            if key not in data:
                raise _Invalid((), f"missing required key '{key}'")
        steps = data["steps"]
        if not isinstance(steps, list):
            raise _Invalid(("steps",), "steps must be a list")
        steps = tuple(_build_step(s, ("steps", i)) for i, s in enumerate(steps))
        if any(isinstance(s, LLMQuantizeConfig) for s in steps):
            for key, instead in ENCODER_ONLY_KEYS.items():
                if key in data:
                    raise _Invalid((key,), f"'{key}' belongs to the ONNX encoder path; {instead}")
        output = _convert(str, data.get("output", ""), ("output",))
        model = _convert(str, data["model"], ("model",))
        kwargs = {
            "name": _convert(str, data["name"], ("name",)) if "name" in data else _default_name(output, model),
            "model": model,
            "steps": steps,
            "data": _build(DataConfig, data.get("data"), ("data",)),
            "gates": _build(Gates, data.get("gates"), ("gates",)),
            "targets": _build(Targets, data.get("targets"), ("targets",)),
            "output": output,
            "model_as_written": model,
        }
        if base_dir is not None:
            kwargs = _resolve_paths(kwargs, base_dir, resolve_output=resolve_output)
        try:
            recipe = Recipe(**kwargs)
        except ValueError as e:
            raise _Invalid((), str(e)) from None
        if check_paths:
            _check_paths(recipe)
        return recipe
    except _Invalid as e:
        line = lines.get(e.path)
        where = f"{source}, line {line}" if line else source
        raise RecipeError(f"{where}: {_fmt_path(e.path)}: {e.message}") from None


def _default_name(output: str, model: str) -> str:
    """A recipe without a name is named after its output directory, or else its model."""
    return Path(output).name or re.sub(r"[^\w.-]+", "-", Path(model).name or model).strip("-") or "model"


def _resolve_paths(kwargs: dict, base_dir: Path, *, resolve_output: bool = True) -> dict:
    """Relative file paths in a recipe file are relative to the recipe file, not the working directory.
    A written `output` is one of them; without one the artifact goes to runs/NAME in the working directory."""
    from inferforge.models import looks_like_path

    if resolve_output and kwargs["output"] and not Path(kwargs["output"]).is_absolute():
        kwargs["output"] = os.path.normpath(base_dir / kwargs["output"])
    if looks_like_path(kwargs["model"]) and not Path(kwargs["model"]).is_absolute():
        kwargs["model"] = str(base_dir / kwargs["model"])
    data = kwargs["data"]
    if data.sentences != "demo" and not Path(data.sentences).is_absolute():
        data = kwargs["data"] = dataclasses.replace(data, sentences=str(base_dir / data.sentences))
    if data.extra_sentences and not Path(data.extra_sentences).is_absolute():
        kwargs["data"] = dataclasses.replace(data, extra_sentences=str(base_dir / data.extra_sentences))
    kwargs["steps"] = tuple(
        dataclasses.replace(s, calibration=str(base_dir / s.calibration))
        if isinstance(s, LLMQuantizeConfig) and s.calibration and not Path(s.calibration).is_absolute() else s
        for s in kwargs["steps"])
    kwargs["steps"] = tuple(
        dataclasses.replace(s, data=tuple(p if Path(p).is_absolute() else str(base_dir / p) for p in s.data),
                            student=s.student if s.student is None or Path(s.student).is_absolute()
                            else str(base_dir / s.student))
        if isinstance(s, DistillStepConfig) else s for s in kwargs["steps"])
    return kwargs


def _check_paths(recipe: Recipe) -> None:
    from inferforge.models import check_model_spec

    try:
        check_model_spec(recipe.model)
    except ValueError as e:
        raise _Invalid(("model",), str(e)) from None
    if recipe.data.sentences != "demo" and not Path(recipe.data.sentences).is_file():
        raise _Invalid(("data", "sentences"), f"file not found: {recipe.data.sentences} "
                                              "(give a text file with one sentence per line, or 'demo')")
    if recipe.data.extra_sentences is not None and not Path(recipe.data.extra_sentences).is_file():
        raise _Invalid(("data", "extra_sentences"), f"file not found: {recipe.data.extra_sentences} "
                                                    "(give a text file with one sentence per line)")
    distill = recipe.step(DistillStepConfig)
    if distill is not None:
        i = recipe.steps.index(distill)
        for j, path in enumerate(distill.data):
            if not Path(path).is_file():
                raise _Invalid(("steps", i, "distill", "data", j), f"file not found: {path} (give a .txt file, one "
                                                                   "passage per line, or a .jsonl file with \"text\")")
            if Path(path).suffix.lower() not in (".txt", ".jsonl"):
                raise _Invalid(("steps", i, "distill", "data", j), f"{path}: not a .txt or .jsonl file (give a .txt "
                                                                   "file, one passage per line, or a .jsonl file with "
                                                                   "\"text\")")
        if distill.student is not None and not (Path(distill.student) / "config.json").is_file():
            raise _Invalid(("steps", i, "distill", "student"), f"{distill.student}: no config.json; give a directory "
                                                               "with the student's Hugging Face config.json")
    if recipe.kind == "causal-lm":
        _check_causal_lm(recipe)
    else:
        _check_encoder_dir(recipe)


def _check_encoder_dir(recipe: Recipe) -> None:
    """The ONNX path reads a local directory's config.json and weights: refuse a causal LM, a corrupt config
    or a truncated safetensors file before any work starts."""
    from inferforge.checkpoint_files import check_safetensors_files, read_config
    from inferforge.errors import UserInputError
    from inferforge.models import looks_like_path

    if not looks_like_path(recipe.model):
        return
    try:
        config = read_config(recipe.model)
        check_safetensors_files(recipe.model)
    except UserInputError as e:
        raise _Invalid(("model",), str(e)) from None
    architectures = [str(a) for a in config.get("architectures") or []]
    causal = [a for a in architectures if a.endswith("ForCausalLM")]
    if causal:
        raise _Invalid(("model",), f"'{recipe.model}' holds {causal[0]}, a causal LM; export and the ONNX int8 path "
                                   "take encoders. Quantize it with `inferforge quantize DIR --config FORMAT` (or a "
                                   "recipe whose one step is a quantize with a config), run it with "
                                   "`inferforge generate DIR`")


def _check_causal_lm(recipe: Recipe) -> None:
    from inferforge.models import looks_like_path

    if not looks_like_path(recipe.model):
        raise _Invalid(("model",), f"'{recipe.model}' is not a checkpoint directory; the causal-LM quantize step "
                                   "needs a local Hugging Face Llama / Mistral / Qwen2 directory")
    try:
        config = json.loads((Path(recipe.model) / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Invalid(("model",), f"{recipe.model}/config.json is not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        found = ", ".join(map(str, architectures)) or f"model_type {config.get('model_type')!r}"
        raise _Invalid(("model",), f"'{recipe.model}' holds {found}, not a causal LM (config.json architectures "
                                   "has no *ForCausalLM); for an encoder drop 'config' from the quantize step and "
                                   "start the steps with export")
    from inferforge.runtime.llama import SUPPORTED

    if config.get("model_type") not in SUPPORTED:
        raise _Invalid(("model",), f"'{recipe.model}' is a {config.get('model_type')!r} causal LM; quantized artifacts "
                                   f"run on the engine, which runs {', '.join(SUPPORTED)} checkpoints")
    (step,) = recipe.steps
    if step.calibration is not None and not Path(step.calibration).is_file():
        raise _Invalid(("steps", 0, "quantize", "calibration"),
                       f"file not found: {step.calibration} (give a .txt file, one text per line, or a .jsonl "
                       "file with a \"text\" field per line)")


def load_recipe(path: str | Path, *, check_paths: bool = True, output_relative_to_recipe: bool = True) -> Recipe:
    """Read and validate a YAML recipe file. Raises `RecipeError` with the key and line on any problem.

    Relative paths in it are relative to the recipe file, `output` included; a built-in recipe is
    loaded with `output_relative_to_recipe=False` so that its artifact lands in the working directory."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    return parse_recipe(text, source=str(path), base_dir=path.resolve().parent, check_paths=check_paths,
                        resolve_output=output_relative_to_recipe)


def parse_recipe(text: str, *, source: str = "recipe", base_dir: Path | None = None,
                 check_paths: bool = True, resolve_output: bool = True) -> Recipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    return recipe_from_dict(data, source=source, lines=_Lines(node), base_dir=base_dir, check_paths=check_paths,
                            resolve_output=resolve_output)


def builtin_recipe_path(name: str = "demo") -> Path:
    return Path(__file__).parent / "recipes" / f"{name}.yaml"

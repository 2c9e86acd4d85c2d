"""`inferforge export`: the command's flags and where each input goes.

- A Llama / Mistral / Qwen2 checkpoint (config.json `model_type`) or a causal-LM artifact (causal-lm,
  quantized-causal-lm, or a distilled-causal-lm student, recorded as the parent): an ONNX
  decoder artifact (`inferforge.optimize.llm_export_artifact.export_llm`), `--fp16` and `--format`
  tensorrt / triton included. Another decoder architecture is refused in one line.
- An encoder (a model directory, a distilled-encoder student, the demo name or module:function): the recipe's export and validate
  steps, as before; `--format triton --repository DIR` then writes the artifact into a Triton repository.
- An ONNX artifact already written (sentence-encoder or onnx-causal-lm): `--format triton` writes it
  into the repository, `--format tensorrt` writes a copy with the TensorRT readiness files at --output.
"""

from __future__ import annotations

import json
from pathlib import Path

from inferforge.errors import UserInputError

ONNX_ARTIFACT_KINDS = ("sentence-encoder", "onnx-causal-lm")
# Artifacts that are also Hugging Face model directories of an encoder: exported as the model directory.
ENCODER_MODEL_KINDS = ("distilled-encoder",)
# Encoder-only flags (the cosine gate and its sentences): None unless given, so a decoder export or an
# existing artifact can refuse them instead of ignoring them; an encoder export fills in these defaults.
ENCODER_FLAGS = {"min_cosine": "--min-cosine", "sentences": "--sentences", "calibration_size": "--calibration-size",
                 "held_out_size": "--held-out-size"}
_ENCODER_DEFAULTS: dict = {}      # dest -> the shared parser's default, filled when the parser is built
DECODER_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def add_export_parser(sub, fmt, model_args, common) -> None:
    """Register `export` on the subparsers `sub`; `model_args` and `common` are the CLI's shared flag groups."""
    # allow_abbrev=False: `--calibration` must not be taken for a prefix of `--calibration-size`.
    p = sub.add_parser("export", formatter_class=fmt, allow_abbrev=False, help="export a model to ONNX and validate it",
                       description="Export to ONNX with optimum-onnx, check ONNX Runtime against PyTorch, and write "
                                   "an artifact. Encoders: cosine against the source on held-out sentences. "
                                   "Llama / Mistral / Qwen2 checkpoints and causal-LM artifacts: one decoder graph "
                                   "with past key/values, its logits and present key/values against PyTorch and 16 "
                                   "greedy tokens that must be identical; `inferforge generate`, `bench` and "
                                   "`inferforge.load` run the artifact on ONNX Runtime.",
                       epilog="examples:\n  inferforge export all-MiniLM-L6-v2 --output runs/minilm-onnx\n"
                              "  inferforge export ./Llama-3.2-1B --output runs/llama-onnx\n"
                              "  inferforge export ./Qwen2-0.5B --fp16 --opset 18 --output runs/qwen-onnx-fp16\n"
                              "  inferforge export runs/llama-int4 --output runs/llama-int4-onnx\n"
                              "  inferforge export runs/llama-w8a8 --calibration cal.txt --output runs/llama-w8a8-onnx\n"
                              "  inferforge export ./Llama-3.2-1B --format tensorrt --output runs/llama-trt\n"
                              "  inferforge export runs/llama-onnx --format triton --repository models/")
    model_args(p, model_help="; a Llama / Mistral / Qwen2 checkpoint or causal-LM artifact gives an ONNX decoder; "
                             "an ONNX artifact with --format tensorrt|triton")
    for action in p._actions:
        if action.dest in ENCODER_FLAGS:
            _ENCODER_DEFAULTS[action.dest] = action.default
            action.default, action.help = None, f"encoders: {action.help}"
    opset = next(a for a in p._actions if a.dest == "opset")
    opset.default, opset.help = None, ("ONNX opset (default 17 for an encoder; for a decoder, which takes 14 to 21, "
                                       "auto: 18, or 19 for an fp8 artifact)")
    p.add_argument("--format", default="onnx", metavar="onnx|tensorrt|triton",
                   help="onnx: the artifact (default onnx); tensorrt: plus TensorRT readiness files and optimization "
                        "profiles under tensorrt/ (a graph TensorRT cannot build fails: exit 1, nothing written, "
                        "the readiness report in OUTPUT.failed/); triton: plus a version of it in the Triton model "
                        "repository --repository")
    p.add_argument("--fp16", action="store_true",
                   help="decoders: convert the graph to fp16 (RMSNorm, Softmax, reductions and rotary embedding stay "
                        "fp32, logits fp32), validated at a looser tolerance with identical greedy tokens")
    p.add_argument("--calibration", metavar="FILE",
                   help="w8a8 / fp8 artifacts: .txt / .jsonl text for the graph's static activation scales (default: "
                        "the artifact's own calibration file, when found unchanged)")
    p.add_argument("--repository", metavar="DIR", help="with --format triton: the Triton model repository to write into")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="with --format tensorrt: the profiles' largest batch; with --format triton: the config's "
                        "max_batch_size (default 8)")
    p.add_argument("--max-sequence", type=int, metavar="N",
                   help="with --format tensorrt: the longest sequence the profiles take, at most the model's "
                        "max_position_embeddings (default: encoders min(512, positions); decoders min(4096, "
                        "positions) as the whole context, half of it per call, the rest as past)")
    common(p)
    p.set_defaults(func=cmd_export)


def _is_decoder(config: dict) -> bool:
    architectures = [str(a) for a in config.get("architectures") or []]
    return bool(config.get("is_decoder")) or any(a.endswith(DECODER_ARCHITECTURE_SUFFIXES) for a in architectures)


def _route(args) -> str:
    """'decoder', 'onnx-artifact' or 'encoder' for args.model; refuses what none of them takes."""
    from inferforge.checkpoint_files import read_config
    from inferforge.manifest import MANIFEST_NAME, read_manifest
    from inferforge.models import looks_like_path
    from inferforge.optimize.llm_export_artifact import (
        LLM_INPUT_KINDS,
        SUPPORTED_TYPES,
        unsupported_architecture,
    )

    path = Path(args.model)
    if (path / MANIFEST_NAME).is_file():
        kind = read_manifest(path).get("kind")
        if kind in LLM_INPUT_KINDS:
            return "decoder"
        if kind in ONNX_ARTIFACT_KINDS:
            return "onnx-artifact"
        if kind in ENCODER_MODEL_KINDS:
            return "encoder"
        raise UserInputError(f"{path} is a {kind} artifact; export takes a model directory, a causal-LM artifact, or "
                             "an ONNX artifact with --format tensorrt|triton")
    if not looks_like_path(args.model):
        return "encoder"          # the demo model or module:function
    if not path.exists():
        raise UserInputError(f"{path} does not exist; give a model directory (config.json and weights), a "
                             "causal-LM artifact, 'all-MiniLM-L6-v2' or module:function")
    if path.is_dir() and (path / "config.json").is_file():
        config = read_config(path)
        if config.get("model_type") in SUPPORTED_TYPES:
            return "decoder"
        if _is_decoder(config):
            raise unsupported_architecture(config.get("model_type"))
    return "encoder"


def _given_encoder_flags(args) -> list[str]:
    return [flag for dest, flag in ENCODER_FLAGS.items() if getattr(args, dest, None) is not None]


def cmd_export(args) -> int:
    from inferforge.optimize.llm_export_artifact import FORMATS

    if args.format not in FORMATS:
        raise UserInputError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
    route = _route(args)
    given = _given_encoder_flags(args)
    if given and route != "encoder":
        what = "a decoder export is gated by its logits and greedy tokens against PyTorch" if route == "decoder" \
            else f"{args.model} is an ONNX artifact already validated"
        raise UserInputError(f"{given[0]} sets an encoder's cosine gate; {what}, drop {given[0]}")
    if args.calibration is not None and route != "decoder":
        raise UserInputError("--calibration FILE sets the static activation scales of a w8a8 / fp8 artifact's export; "
                             f"{args.model} is not a quantized artifact, drop --calibration")
    if route == "decoder":
        return _export_decoder(args)
    if route == "onnx-artifact":
        return _existing_artifact(args)
    return _export_encoder(args)


def _export_decoder(args) -> int:
    from inferforge.cli import _progress
    from inferforge.optimize.llm_export_artifact import export_llm

    name = args.name or Path(args.model).resolve().name
    out = args.output or f"runs/{name}-onnx{'-fp16' if args.fp16 else ''}"
    manifest = export_llm(args.model, out, opset=args.opset, fp16=args.fp16, fmt=args.format,
                          repository=args.repository, name=name, progress=_progress(args),
                          calibration=args.calibration, max_batch=args.max_batch, max_sequence=args.max_sequence)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    validation, speed = manifest["validation"], manifest["throughput"]
    worst = max(c["logits_max_abs_diff"] for c in validation["cases"])
    print(f"artifact: {Path(out).resolve()}")
    print(f"validation: logits max |diff| {worst:.3g} over {len(validation['cases'])} cases; greedy tokens "
          f"{'identical' if validation['identical'] else 'not identical'} for {validation['greedy_steps']} steps")
    print(f"speed: {speed['tokens_per_s']:.1f} tokens/s at batch 1 ({speed['provider']})")
    if "quantized_export" in manifest:
        print(quantized_summary(manifest))
    if "tensorrt" in manifest:
        print(f"tensorrt: {Path(out).resolve() / 'tensorrt'} (ready: {manifest['tensorrt'].get('ready')})")
    if "triton" in manifest:
        print(f"triton: {manifest['triton']['version_dir']}")
    return 0


def quantized_summary(manifest: dict) -> str:
    """'quantized: int4-g128 as MatMulNBits (opset 18); float32 graph 12.3 tokens/s ...' for a quantized export."""
    record = manifest["quantized_export"]
    return (f"quantized: {record['format']} as {record['op']} (opset {manifest['export']['opset']}); float32 graph "
            f"{manifest['throughput_float']['tokens_per_s']:.1f} tokens/s at batch 1 on the same machine")


def _encoder_only_flags(args) -> None:
    if args.fp16:
        raise UserInputError("--fp16 is for decoders (Llama, Mistral, Qwen2); an encoder exports in fp32 (quantize it "
                             "with `inferforge quantize`)")
    if args.format == "tensorrt":
        raise UserInputError("--format tensorrt on an encoder: export it first (`inferforge export MODEL --output "
                             "DIR`), then run `inferforge export DIR --format tensorrt --output DIR2`")
    if args.format == "triton" and args.repository is None:
        raise UserInputError("--format triton needs --repository DIR, the Triton model repository to write into")
    if args.repository is not None and args.format != "triton":
        raise UserInputError("--repository is for --format triton; add --format triton or drop --repository")
    if args.max_sequence is not None:
        raise UserInputError("--max-sequence sizes TensorRT profiles; for an encoder, export it first, then run "
                             "`inferforge export DIR --format tensorrt --max-sequence N --output DIR2`")
    if args.max_batch is not None and args.format != "triton":
        raise UserInputError("--max-batch sizes TensorRT profiles and Triton's max_batch_size; add --format triton "
                             "or drop --max-batch")


def _export_encoder(args) -> int:
    from inferforge.cli import _adhoc_recipe
    from inferforge.recipe import ExportConfig

    _encoder_only_flags(args)
    if args.opset is None:
        args.opset = ExportConfig().opset
    for dest, default in _ENCODER_DEFAULTS.items():     # the shared parser's defaults, for the flags not given
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    triton = None
    if args.format == "triton":
        from inferforge.optimize.llm_export_artifact import _import_optional

        triton = _import_optional("inferforge.optimize.triton_repo", "--format triton")
    name = args.name or Path(args.model).name or "model"
    args.output = args.output or f"runs/{name}-export"
    code = _adhoc_recipe(args, [{"export": {"opset": args.opset}}, "validate"])
    if code == 0 and triton is not None:
        max_batch = 8 if args.max_batch is None else args.max_batch
        version = triton.write_triton_repository(Path(args.output), args.repository, name=args.name,
                                                 max_batch_size=max_batch)
        print(f"triton: {version}")
    return code


def _existing_artifact(args) -> int:
    """An ONNX artifact: --format triton writes it into the repository, tensorrt a copy with readiness files."""
    from inferforge.manifest import verify_artifact
    from inferforge.optimize.llm_export_artifact import _import_optional
    from inferforge.optimize.tensorrt_export import check_profile_flags, tensorrt_artifact

    if args.fp16:
        raise UserInputError(f"{args.model} is already an ONNX artifact; --fp16 applies when exporting a checkpoint: "
                             "export the source checkpoint with --fp16")
    if args.format == "onnx":
        raise UserInputError(f"{args.model} is already an ONNX artifact; add --format tensorrt or --format triton, or "
                             "export its source model")
    if args.opset is not None:
        raise UserInputError(f"--opset {args.opset}: {args.model} is already an ONNX artifact, its graph keeps the "
                             "opset it was exported at; re-export its source model with --opset, or drop --opset")
    check_profile_flags(args.format, max_batch=args.max_batch, max_sequence=args.max_sequence, position_limit=None)
    if args.format == "triton":
        if args.repository is None:
            raise UserInputError("--format triton needs --repository DIR, the Triton model repository to write into")
        triton = _import_optional("inferforge.optimize.triton_repo", "--format triton")
        verify_artifact(args.model)
        max_batch = 8 if args.max_batch is None else args.max_batch
        version = triton.write_triton_repository(Path(args.model), args.repository, name=args.name,
                                                 max_batch_size=max_batch)
        print(f"triton: {version}")
        return 0
    if args.repository is not None:
        raise UserInputError("--repository is for --format triton; add --format triton or drop --repository")
    name = args.name or Path(args.model).resolve().name
    out = args.output or f"runs/{name}-tensorrt"
    manifest = tensorrt_artifact(args.model, out, name=args.name, max_batch=args.max_batch,
                                 max_sequence=args.max_sequence)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"artifact: {Path(out).resolve()}\ntensorrt: {Path(out).resolve() / 'tensorrt'} "
              f"(ready: {manifest['tensorrt'].get('ready')})")
    return 0

"""`inferforge.load`: import an optimized artifact as a runnable model, after checking its hashes."""

from __future__ import annotations

from pathlib import Path

from inferforge.errors import ArtifactError
from inferforge.manifest import verify_artifact

# Manifest kinds that generate, serve and bench run: `load` returns an `LLMEngine` for the PyTorch ones,
# an `inferforge.optimize.onnx_decoder.OnnxDecoder` for ONNX_LLM_KIND (`inferforge export` of a decoder).
ONNX_LLM_KIND = "onnx-causal-lm"
LLM_KINDS = ("causal-lm", "quantized-causal-lm", "distilled-causal-lm", ONNX_LLM_KIND)


def load(path: str | Path, *, threads: int | None = None, allow_failed: bool = False,
         verify_signature: str | Path | None = None, **engine_kwargs):
    """Load the artifact directory `path` written by a run.

    Verifies the manifest and every file against it first (a tampered or incomplete artifact raises
    `ArtifactError`) and refuses an artifact whose accuracy gate failed unless `allow_failed=True`.
    With `verify_signature="public.pem"`, the artifact must also carry a signature made by the
    matching private key (`inferforge sign`) over exactly these files; otherwise `ArtifactError`.
    For a sentence encoder it returns a callable with the source model's signature:
    `model(sentences: list[str]) -> np.ndarray [n, hidden] float32` (L2-normalized, mean-pooled).
    For a Llama-family model (kind `causal-lm`, or `quantized-causal-lm` from `quantize --config`,
    whose quantized layers run on inferforge's kernels) it returns an `inferforge.runtime.engine.LLMEngine`
    (`engine_kwargs` go to `LLMEngine.from_pretrained`). For an exported decoder (kind `onnx-causal-lm`,
    `inferforge export LLAMA_DIR`) it returns an `inferforge.optimize.onnx_decoder.OnnxDecoder` on ONNX
    Runtime, with the same `generate` / `stream` (`engine_kwargs` go to `OnnxDecoder.from_artifact`).
    A distilled student (`inferforge distill`): kind `distilled-causal-lm` gives the `LLMEngine`, kind
    `distilled-encoder` a `inferforge.encoder.TorchEncoder` over the student's PyTorch weights, with the
    same call signature as the ONNX encoder. The manifest is available as `.manifest`.

    `path` may also name a registered version, `"NAME@ALIAS"` or `"NAME@3"` (when no such path exists):
    the registry at `INFERFORGE_REGISTRY` resolves it and its stored copy is loaded, verified as above.
    """
    from inferforge.registry_refs import resolve_artifact_arg

    path = resolve_artifact_arg(path)
    if verify_signature is not None:
        from inferforge.signing import verify_signature as check_signature

        manifest = check_signature(path, verify_signature)
    else:
        manifest = verify_artifact(path)
    if not manifest.get("accuracy_passed", False) and not allow_failed:
        failed = [c["name"] for c in manifest.get("checks", []) if c.get("kind") == "gate" and not c.get("passed")]
        raise ArtifactError(f"{path}: this artifact failed its accuracy gate ({', '.join(failed) or 'unknown'}); "
                            "pass allow_failed=True to load it anyway")
    kind = manifest.get("kind")
    if kind == ONNX_LLM_KIND:
        from inferforge.optimize.onnx_decoder import OnnxDecoder

        decoder = OnnxDecoder.from_artifact(path, model=manifest["runtime"]["model"], threads=threads, **engine_kwargs)
        decoder.manifest = manifest
        return decoder
    if kind in LLM_KINDS:
        from inferforge.runtime.engine import LLMEngine

        engine = LLMEngine.from_pretrained(path, **engine_kwargs)
        engine.manifest = manifest
        return engine
    if kind == "distilled-encoder":
        from inferforge.encoder import TorchEncoder

        model = TorchEncoder(path, max_length=manifest["runtime"]["max_length"], threads=threads)
        model.manifest = manifest
        return model
    if kind != "sentence-encoder":
        raise ArtifactError(f"{path}: artifact kind {kind!r} is not supported by this version of inferforge")
    from transformers import AutoTokenizer

    from inferforge.encoder import OnnxEncoder
    from inferforge.ort_config import read_session_options

    runtime = manifest["runtime"]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # The session options the artifact records in ort_config.json (older ones: SkipLayerNormFusion off).
    model = OnnxEncoder(path / runtime["model"], tokenizer, max_length=runtime["max_length"], threads=threads,
                        session_options=read_session_options(path, manifest))
    model.manifest = manifest
    return model


CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def package_checkpoint(model_dir: str | Path, out_dir: str | Path, *, name: str | None = None) -> Path:
    """Package a Hugging Face Llama / Mistral / Qwen2 directory as an artifact (weights unchanged):
    config, safetensors and tokenizer files plus a manifest. `inferforge.load(out_dir)` returns an
    `LLMEngine`. Written in a staging directory and moved into place at the end."""
    import json
    import shutil

    from inferforge.errors import UserInputError
    from inferforge.manifest import environment, staged_artifact, utc_now, write_manifest
    from inferforge.models import weights_sha256
    from inferforge.runtime.llama import LlamaSpec

    model_dir, out = Path(model_dir), Path(out_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise UserInputError(f"{model_dir}: no config.json; give a Hugging Face checkpoint directory")
    spec = LlamaSpec.from_config(json.loads((model_dir / "config.json").read_text()), source=str(model_dir))
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise UserInputError(f"{model_dir}: no *.safetensors weights")
    with staged_artifact(out) as staging:
        for f in [*weights, *(model_dir / n for n in CHECKPOINT_FILES)]:
            if f.is_file():
                shutil.copyfile(f, staging / f.name)
        write_manifest(staging, {
            "name": name or model_dir.resolve().name, "created": utc_now(), "kind": "causal-lm",
            "runtime": {"engine": "inferforge.runtime.engine.LLMEngine", "model_type": spec.model_type},
            "source": {"model": str(model_dir), "path": str(model_dir.resolve()),
                       "weights_sha256": weights_sha256(model_dir)},
            "steps": [{"name": "package", "settings": {}, "duration_s": 0.0, "summary": "weights copied unchanged"}],
            "checks": [], "passed": True, "accuracy_passed": True, "environment": environment(),
        })
    return out

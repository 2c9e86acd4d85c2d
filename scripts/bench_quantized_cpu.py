"""Decode speed of quantized Llama artifacts against float32 on the CPU, through the user's path.

Builds a seeded random Llama (transformers LlamaConfig: hidden 1024, 16 layers, 16 heads / 4 KV
heads, intermediate 2816, vocab 32000, about 300M parameters) as safetensors, quantizes it with
`inferforge quantize` (default skips: lm_head stays float), loads every artifact with
`inferforge.load`, then times `engine.generate` at batch 1 (a 32-token prompt, 128 new tokens, greedy),
the formats interleaved in one process and repeated, each repeat on a fresh prompt. tokens/s = new
tokens / generate wall time (prefill included). Prints median, min and max per format and the median ratio to float32.

    python scripts/bench_quantized_cpu.py --workdir /tmp/qbench --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests.factories_llama

FORMATS = {"int8": ["--config", "int8-weight-only"], "int4": ["--config", "int4-g128"],
           "w8a8": ["--config", "w8a8"], "fp8": ["--config", "fp8"]}


def build(workdir: Path, formats: list[str]) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from inferforge.cli import main
    from tests.factories_llama import save_word_text, save_word_tokenizer

    fp32 = workdir / "fp32"
    if not (fp32 / "model.safetensors").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=4, initializer_range=0.05,
                          max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(cfg).eval().save_pretrained(fp32, safe_serialization=True)
        save_word_tokenizer(fp32, vocab_size=32000)
    cal = save_word_text(workdir / "cal.txt", vocab_size=32000)
    paths = {"fp32": fp32}
    for name in formats:
        out = workdir / name
        if not (out / "quantization.json").is_file():
            extra = ["--calibration", str(cal), "--num-samples", "8", "--seq-len", "64"] if name == "w8a8" else []
            code = main(["quantize", str(fp32), *FORMATS[name], "--no-gate", *extra, "--output", str(out), "-q"])
            if code != 0:
                raise SystemExit(f"inferforge quantize {name} failed with exit code {code}")
        paths[name] = out
    return paths


def main() -> None:
    import inferforge

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/inferforge-qbench"))
    parser.add_argument("--formats", default="int8,int4,w8a8", help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reference", action="store_true",
                        help="also time the previous path (INFERFORGE_CPU_PACKED=0) once per format, 16 new tokens")
    args = parser.parse_args()
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    paths = build(args.workdir, [f for f in args.formats.split(",") if f])
    from inferforge.runtime.engine import LLMEngine

    # The float checkpoint is a plain Hugging Face directory; the quantized ones are artifacts.
    engines = {name: (LLMEngine.from_pretrained if name == "fp32" else inferforge.load)(
        path, dtype=torch.float32, device="cpu", max_num_seqs=1) for name, path in paths.items()}
    def draw_prompt(seed: int) -> list[list[int]]:
        return [[1] + [int(t) for t in torch.randint(3, 32000, (args.prompt_len - 1,),
                                                     generator=torch.Generator().manual_seed(seed))]]

    outputs, rates = {}, {name: [] for name in engines}
    for engine in engines.values():          # warm-up
        engine.generate(draw_prompt(0), max_new_tokens=4, stop_token_ids=[])
    for rep in range(args.repeats):
        # A fresh prompt per repeat, the same for every format: a repeated one would be served partly
        # from the engine's prefix cache.
        prompt = draw_prompt(1 + rep)
        for name, engine in engines.items():
            start = time.perf_counter()
            outputs[name] = engine.generate(prompt, max_new_tokens=args.new_tokens, stop_token_ids=[])[0]
            rates[name].append(args.new_tokens / (time.perf_counter() - start))
    base = statistics.median(rates["fp32"])
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.repeats} interleaved repeats")
    for name, r in rates.items():
        same = sum(a == b for a, b in zip(outputs[name], outputs["fp32"]))
        print(f"{name:6s} median {statistics.median(r):7.2f} tok/s (min {min(r):7.2f}, max {max(r):7.2f})  "
              f"x{statistics.median(r) / base:.2f} vs fp32  greedy tokens equal to fp32: {same}/{len(outputs[name])}")
    if args.reference:
        os.environ["INFERFORGE_CPU_PACKED"] = "0"      # read at load: the engines load again without packing
        for name, path in paths.items():
            if name != "fp32":
                engine = inferforge.load(path, dtype=torch.float32, device="cpu", max_num_seqs=1)
                start = time.perf_counter()
                engine.generate(prompt, max_new_tokens=16, stop_token_ids=[])
                print(f"{name:6s} previous path: {16 / (time.perf_counter() - start):7.2f} tok/s")


if __name__ == "__main__":
    main()

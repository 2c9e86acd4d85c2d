"""Compile report: build shipped kernel configurations for Hopper (sm_90) without a GPU, and read what
the compiler did with them.

Triton compiles for any NVIDIA target on a machine without a GPU (it ships `ptxas`), so CI can check
properties that decide speed on the real card:
- registers per thread and spill bytes (`ptxas -v` on the generated PTX): a spill means local-memory
  traffic in the inner loop, usually a large slowdown;
- shared memory per program (Triton's metadata) against the sm_90 limit of 227 KiB per block;
- the tensor-core path: Hopper's asynchronous warpgroup MMA shows as `wgmma` in the PTX; a kernel that
  falls back to `mma.sync` (Ampere-style) loses about half the peak.

A kernel module offers its shipped configurations through a `compile_specs()` function returning
`KernelSpec`s; `PROVIDERS` names those functions. The report runs in a subprocess without
`TRITON_INTERPRET` (under the interpreter `@triton.jit` gives interpreted functions, which cannot be
compiled): `python -m inferforge.kernels.compile_report [--kernels attention,...] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

SM90_SHARED_LIMIT = 227 * 1024        # bytes of shared memory one block may use on H100 / H200 (opt-in maximum)

# kernel family -> "module:function" returning a list of KernelSpec
PROVIDERS: dict[str, str] = {
    "attention": "inferforge.kernels.attention_compile:compile_specs",
    "weight_only": "inferforge.kernels.weight_only_specs:compile_specs",
}


@dataclass(frozen=True)
class KernelSpec:
    """One configuration to compile: the kernel object (`@triton.jit`, possibly under autotune or
    heuristics), its argument types (`*fp16`, `i32`, `fp32`, `constexpr` ...) and constexpr values."""

    family: str                  # "attention", "weight_only", ...
    label: str                   # what the configuration is, e.g. "bf16 d128 causal 128x64 w8 s3"
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    expect_wgmma: bool = False   # the configuration is meant to run on Hopper tensor cores
    # Argument attributes as a launch would set them ({(index,): [["tt.divisibility", 16]]}): aligned
    # pointers and strides let the compiler vectorize loads; `launch_signature` derives them.
    attrs: dict | None = None


@dataclass(frozen=True)
class CompiledKernel:
    family: str
    label: str
    registers: int
    spill_bytes: int             # spill stores + spill loads reported by ptxas
    shared_bytes: int
    wgmma: bool
    expect_wgmma: bool
    num_warps: int
    num_stages: int
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a Triton kernel (run the compile report without TRITON_INTERPRET)")
        kernel = kernel.fn
    return kernel


def launch_signature(kernel, args: dict, *, arch: int = 90) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) that launching `kernel` with `args` (every parameter by name:
    tensors, ints, floats, None, constexpr values) would compile: Triton's own binder decides which ints
    become i32/i64 or the constant 1, which pointers and ints count as 16-divisible, and it honours
    `do_not_specialize`. Tensors may be tiny CPU tensors of the right dtype; only dtype and alignment matter."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(kernel)
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", arch, 32)))
    bound, specialization, _ = binder(**args)
    names = [p.name for p in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    constexprs = {name: bound[name] for name, kind in signature.items() if kind == "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, spec in enumerate(specialization)
             if spec[0] != "constexpr" and isinstance(spec[1], str) and "D" in spec[1]}
    return signature, constexprs, attrs


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        ptxas = nvidia.get_ptxas(arch).path
    except TypeError:            # older Triton: get_ptxas() takes no argument
        ptxas = nvidia.get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_spec(spec: KernelSpec, *, arch: int = 90) -> CompiledKernel:
    """Compile one configuration for sm_`arch` and check registers, spills, shared memory and wgmma."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=_jit_function(spec.kernel), signature=spec.signature, constexprs=spec.constexprs,
                       attrs=spec.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_usage(ptx, arch)
    shared = int(compiled.metadata.shared)
    wgmma = "wgmma.mma_async" in ptx
    return CompiledKernel(spec.family, spec.label, registers, spills, shared, wgmma, spec.expect_wgmma,
                          spec.num_warps, spec.num_stages, find_problems(spills, shared, wgmma, spec.expect_wgmma))


def find_problems(spill_bytes: int, shared_bytes: int, wgmma: bool, expect_wgmma: bool) -> list[str]:
    """What the guard fails a configuration for: any spill, shared memory over the sm_90 limit, or no
    wgmma where the tiles should use Hopper's tensor cores."""
    problems = []
    if spill_bytes:
        problems.append(f"spills {spill_bytes} bytes to local memory")
    if shared_bytes > SM90_SHARED_LIMIT:
        problems.append(f"needs {shared_bytes} bytes of shared memory, over the {SM90_SHARED_LIMIT} limit")
    if expect_wgmma and not wgmma:
        problems.append("fell off the Hopper tensor-core path (no wgmma in the PTX)")
    return problems


_SPECS: list[KernelSpec] = []      # what forked workers compile, by index


def _compile_index(index_arch: tuple[int, int]) -> CompiledKernel:
    index, arch = index_arch
    return compile_spec(_SPECS[index], arch=arch)


def _compile_all(specs: list[KernelSpec], *, arch: int, jobs: int) -> list[CompiledKernel]:
    """Compile in `jobs` forked processes (each compile is single-threaded; a spec holds a kernel object,
    which does not pickle, so workers inherit the list and receive indices)."""
    if jobs <= 1 or len(specs) <= 1:
        return [compile_spec(s, arch=arch) for s in specs]
    import multiprocessing

    _SPECS[:] = specs
    with multiprocessing.get_context("fork").Pool(min(jobs, len(specs))) as pool:
        return pool.map(_compile_index, [(i, arch) for i in range(len(specs))], chunksize=1)


def extra_providers(entries) -> dict[str, str]:
    """"family=module:function" entries (the --provider option, or INFERFORGE_COMPILE_PROVIDERS separated by
    commas): families outside the package, e.g. the test suite's deliberately bad kernels."""
    extra = {}
    for entry in entries:
        family, _, target = entry.partition("=")
        if not family or ":" not in target:
            raise SystemExit(f"provider {entry!r} must look like family=module:function")
        extra[family.strip()] = target.strip()
    return extra


def collect_specs(families: list[str] | None = None) -> list[KernelSpec]:
    unknown = set(families or []) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown kernel families: {', '.join(sorted(unknown))}; choose from {', '.join(PROVIDERS)}")
    specs = []
    for family in families or list(PROVIDERS):
        module, function = PROVIDERS[family].split(":")
        specs.extend(getattr(importlib.import_module(module), function)())
    return specs


def format_table(rows: list[CompiledKernel]) -> str:
    lines = ["| kernel | config | warps | stages | registers | spills (B) | shared (KiB) | wgmma | result |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        wgmma = "yes" if r.wgmma else ("NO" if r.expect_wgmma else "no (not expected)")
        lines.append(f"| {r.family} | {r.label} | {r.num_warps} | {r.num_stages} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes / 1024:.1f} | {wgmma} | {'ok' if r.ok else '; '.join(r.problems)} |")
    return "\n".join(lines)


def run_report(families: list[str] | None = None, *, timeout: float = 900, providers: dict[str, str] | None = None,
               table_file: str | None = None) -> list[dict]:
    """Run the report in a fresh interpreter without TRITON_INTERPRET; returns one dict per configuration.
    This is what tests call: the calling process may have the interpreter on. `providers` adds families
    (name -> "module:function", importable in the subprocess); `table_file` receives the printed table."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "inferforge.kernels.compile_report", "--json", out]
        if families:
            cmd += ["--kernels", ",".join(families)]
        for family, target in (providers or {}).items():
            cmd += ["--provider", f"{family}={target}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if not os.path.exists(out):
            raise RuntimeError(f"compile report failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        if table_file:
            from inferforge.fileio import atomic_write_text

            atomic_write_text(table_file, done.stdout)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferforge.kernels.compile_report",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--kernels", help=f"comma-separated families (default: all of {', '.join(PROVIDERS)})")
    parser.add_argument("--arch", type=int, default=90, help="NVIDIA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--provider", action="append", default=[], metavar="FAMILY=MODULE:FUNCTION",
                        help="add a kernel family (repeatable; also INFERFORGE_COMPILE_PROVIDERS, comma-separated)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    report_set = os.environ.get("INFERFORGE_COMPILE_REPORT_SET", "default")
    if report_set not in ("quick", "default", "full"):
        parser.error(f"INFERFORGE_COMPILE_REPORT_SET={report_set!r}: choose quick, default or full")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    env_providers = [e for e in os.environ.get("INFERFORGE_COMPILE_PROVIDERS", "").split(",") if e.strip()]
    PROVIDERS.update(extra_providers(env_providers + args.provider))
    specs = collect_specs(args.kernels.split(",") if args.kernels else None)
    rows = _compile_all(specs, arch=args.arch, jobs=args.jobs)
    print(format_table(rows))
    if args.json:
        from inferforge.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=1))
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} configurations have problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

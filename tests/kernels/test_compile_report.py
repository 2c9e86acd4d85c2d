"""The compile report for sm_90: every shipped attention configuration compiles without register spills,
within Hopper's shared memory, and on the wgmma tensor-core path; and the guard itself fails on a
spilling or non-wgmma configuration. No GPU needed: Triton compiles for sm_90 and runs ptxas here.

`pytest -s` prints the tables; they are also written under pytest's tmp dir (the path is printed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inferforge.kernels.compile_report import run_report
from tests.conftest import env_without_interpreter

HERE = Path(__file__).parent
GUARD = {"guard": "compile_guard_kernels:compile_specs"}
# A CPU check: on the GPU machine `scripts/gpu_check.sh attention` runs the report itself, and the kernel
# tests' time limit there is for the kernels.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check; scripts/gpu_check.sh attention "
                                "runs the compile report on the GPU machine")


@pytest.fixture
def report_env(monkeypatch):
    # The report's subprocess imports the guard family from this folder (not the repository root, whose
    # inferforge/ would shadow the installed namespace).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("INFERFORGE_COMPILE_REPORT_SET", raising=False)
    return monkeypatch


def check_attention_report(rows, table_file, expected_labels):
    print(f"\n{Path(table_file).read_text()}\n(table written to {table_file})")
    assert len(rows) >= expected_labels
    bad = [f"{r['label']} (w{r['num_warps']} s{r['num_stages']}): {'; '.join(r['problems'])}" for r in rows if not r["ok"]]
    assert not bad, "attention configurations with problems on sm_90:\n" + "\n".join(bad)
    for r in rows:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert 0 < r["shared_bytes"] <= 227 * 1024
        assert r["wgmma"] == r["expect_wgmma"] or r["wgmma"], r["label"]
    assert all(r["wgmma"] for r in rows if not r["label"].startswith("fp32"))


def test_attention_quick_set_compiles_clean_for_sm90(report_env, tmp_path):
    report_env.setenv("INFERFORGE_COMPILE_REPORT_SET", "quick")
    table = tmp_path / "compile-report-attention-quick.md"
    rows = run_report(["attention"], table_file=str(table))
    check_attention_report(rows, table, 4)
    labels = " / ".join(r["label"] for r in rows)
    assert "bf16 d128 causal gqa4 tma" in labels and "paged ptr" in labels and "d64" in labels


@pytest.mark.slow
def test_every_shipped_attention_configuration_compiles_clean_for_sm90(report_env, tmp_path):
    table = tmp_path / "compile-report-attention.md"
    rows = run_report(["attention"], table_file=str(table))
    check_attention_report(rows, table, 25)
    # every autotune config of the main variant, after pruning: 128-row tiles only with 8 warps
    main = [r for r in rows if r["label"].startswith("bf16 d128 causal gqa4 tma ")]
    assert len(main) == 12
    assert not [r for r in rows if r["label"].endswith(("128x64", "128x128")) and r["num_warps"] < 8]


def test_guard_fails_on_spills_and_on_missing_wgmma(report_env, tmp_path):
    """The CLI exits 1 and names each problem; a clean report exits 0 (the attention tests above)."""
    out = tmp_path / "guard.json"
    env = env_without_interpreter()
    done = subprocess.run([sys.executable, "-m", "inferforge.kernels.compile_report", "--kernels", "guard",
                           "--provider", f"guard={GUARD['guard']}", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 1, done.stderr[-3000:]
    spills, no_wgmma = json.loads(out.read_text())
    assert not spills["ok"] and spills["spill_bytes"] > 0 and any("spills" in p for p in spills["problems"])
    assert not no_wgmma["ok"] and not no_wgmma["wgmma"]
    assert no_wgmma["problems"] == ["fell off the Hopper tensor-core path (no wgmma in the PTX)"]
    assert "2 of 2 configurations have problems" in done.stderr
    assert "| guard | spills: 128x128 tile, 1 warp |" in done.stdout


def test_run_report_takes_providers_from_the_caller(report_env):
    rows = run_report(["guard"], providers=GUARD)
    assert [r["ok"] for r in rows] == [False, False]


def test_the_guard_fails_any_spill_too_much_shared_memory_and_a_missing_wgmma():
    from inferforge.kernels.compile_report import SM90_SHARED_LIMIT, find_problems

    assert find_problems(0, SM90_SHARED_LIMIT, True, True) == []
    assert find_problems(0, 1024, False, False) == []                   # CUDA-core kernels need no wgmma
    assert find_problems(4, 0, False, False) == ["spills 4 bytes to local memory"]   # the smallest spill counts
    assert "shared memory" in find_problems(0, SM90_SHARED_LIMIT + 1, True, True)[0]
    assert SM90_SHARED_LIMIT == 227 * 1024                             # the H100/H200 opt-in maximum per block
    assert "wgmma" in find_problems(0, 1024, False, True)[0]

"""Exit codes as the README states them: 0 ok, 1 gate or target missed, 2 bad input (one line, no
traceback), 3 the environment or an unexpected error (a log file holds the traceback), 130 interrupted.

The inputs are built the way users meet them: a config.json cut in the middle of an edit, a safetensors
download cut short, an output on a read-only disk, an unsupported decoder given to `export`.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from inferforge.cli import main
from inferforge.errors import ArtifactError, EnvironmentFailure, GateFailed, RecipeError, UserInputError
from tests.factories_llama import save_tiny_llama, save_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny")
    save_word_tokenizer(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def corrupt_config(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "corrupt")
    (path / "config.json").write_text('{"hidden_size": 64, "num_hidden_')     # an edit cut short
    return path


@pytest.fixture(params=["header", "data"])
def truncated(llama_dir, tmp_path, request):
    """A safetensors file cut inside its JSON header, or inside the tensor data after it."""
    path = _copy(llama_dir, tmp_path / f"truncated-{request.param}")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100] if request.param == "header" else data[: len(data) * 2 // 3])
    return path


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_error_classes():
    assert issubclass(UserInputError, ValueError) and UserInputError("x").exit_code == 2
    assert issubclass(RecipeError, ValueError) and issubclass(ArtifactError, ValueError)
    assert EnvironmentFailure("x").exit_code == 3 and not issubclass(EnvironmentFailure, ValueError)
    assert GateFailed("x").exit_code == 1
    with pytest.raises(ValueError, match="--concurrency"):   # what a Python caller writes
        from inferforge.runtime.plan import plan

        plan(".", memory="1GiB", concurrency=-1)


@pytest.mark.parametrize("command", [["plan", "{}", "--memory", "1GiB"],
                                     ["explain", "{}", "--format", "int4-g128"],
                                     ["generate", "{}", "--prompt", "w5", "--max-new-tokens", "1"],
                                     ["quantize", "{}", "--config", "int8-weight-only", "--no-gate", "--output", "{out}"],
                                     ["export", "{}", "--output", "{out}"]])
def test_corrupt_config_json_is_bad_input(corrupt_config, tmp_path, capsys, command):
    args = [a.format(corrupt_config, out=tmp_path / "out") for a in command]
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{corrupt_config / 'config.json'}" in line and "not valid JSON" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["plan", "{}", "--memory", "1GiB"],
                                     ["generate", "{}", "--prompt", "w5", "--max-new-tokens", "1"],
                                     ["quantize", "{}", "--config", "int8-weight-only", "--no-gate", "--output", "{out}"]])
def test_truncated_safetensors_is_bad_input(truncated, tmp_path, capsys, command):
    args = [a.format(truncated, out=tmp_path / "out") for a in command]
    assert main(args) == 2      # `plan` read only the header and exited 0
    line = _one_line_error(capsys.readouterr().err)
    assert f"{truncated / 'model.safetensors'}" in line and "truncated" in line
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_of_an_encoder_is_bad_input(tmp_path, capsys):
    from tests.factories import tiny_bert

    model, tokenizer = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert main(["export", str(tmp_path / "bert"), "--output", str(tmp_path / "out"), "-q"]) == 2
    assert "model.safetensors" in _one_line_error(capsys.readouterr().err)


def test_export_of_an_unsupported_decoder_is_refused_naming_the_supported_ones(tmp_path, capsys):
    """Llama, Mistral and Qwen2 export to ONNX decoders (tests/test_llm_export.py); other decoders are refused."""
    model = tmp_path / "phi"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}')
    assert main(["export", str(model), "--output", str(tmp_path / "out"), "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line == "error: unsupported architecture phi3; supported: llama, mistral, qwen2"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code, exit_code, fix", [(errno.EROFS, 3, "writable --output"),
                                                  (errno.ENOSPC, 3, "free disk space"),
                                                  (errno.EACCES, 3, "permissions"),
                                                  (errno.ENOTDIR, 2, "check the path")])
def test_output_that_cannot_be_written(tmp_path, capsys, monkeypatch, code, exit_code, fix):
    """A read-only disk, a full one, no permission (root ignores chmod, so the OS's answer is simulated
    where the staging directory is made), and an output under a file."""
    out = tmp_path / "ro" / "out"

    def refuse(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), str(dir or out.parent))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    args = ["export", "tests.factories:tiny_bert", "--output", str(out), "-q"]
    assert main(args) == exit_code
    line = _one_line_error(capsys.readouterr().err)
    assert os.strerror(code) in line and str(out.parent) in line and fix in line


def test_output_under_a_file_is_bad_input(llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    args = ["quantize", str(llama_dir), "--config", "int8-weight-only", "--no-gate", "--output", str(tmp_path / "file" / "out"),
            "-q"]
    assert main(args) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in _one_line_error(capsys.readouterr().err)


def _boom(*args, **kwargs):
    raise RuntimeError("something nobody expected")


def test_unexpected_error_exits_3_with_a_log_file(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INFERFORGE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("inferforge.runtime.plan.plan", _boom)
    assert main(["plan", str(llama_dir), "--memory", "1GiB"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError: something nobody expected" in err
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in err and "--debug" in err
    text = log.read_text()
    assert "Traceback" in text and "_boom" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(llama_dir, tmp_path, capsys, monkeypatch, where):
    monkeypatch.setenv("INFERFORGE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("inferforge.runtime.plan.plan", _boom)
    args = ["plan", str(llama_dir), "--memory", "1GiB"]
    assert main(["--debug", *args] if where == "before" else [*args, "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "_boom" in err
    assert not (tmp_path / "logs").exists()


def test_keyboard_interrupt_exits_130(llama_dir, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("inferforge.runtime.plan.plan", interrupt)
    assert main(["plan", str(llama_dir), "--memory", "1GiB"]) == 130
    assert "interrupted" in capsys.readouterr().err


def _quantize_then_sigint(tmp_path: Path):
    """Start `inferforge quantize` of a tiny BERT, send SIGINT once its staging directory exists; the
    finished process and its stderr."""
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)
    env = {**os.environ, "INFERFORGE_LOG_DIR": str(tmp_path / "logs")}
    # A shell that starts the test run in the background without job control (`cmd &`, nohup) leaves
    # SIGINT ignored, and a child inherits that: Python then installs no KeyboardInterrupt handler and
    # the run ignores the signal. The child gets the default disposition, as a terminal's Ctrl-C has.
    proc = subprocess.Popen([sys.executable, "-m", "inferforge", "quantize", "tests.factories:tiny_bert", "--output",
                             str(runs / "out"), "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not any(runs.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started its staging directory"
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


def test_sigint_during_a_run_exits_130_and_leaves_nothing(tmp_path):
    """Ctrl-C while `inferforge quantize` runs: exit 130, one line, no artifact, no partial or work directory.

    The staging directory exists for seconds before the artifact is published, but on a busy machine the
    signal can still land after publication (the process then ends 0, or -2 during interpreter teardown,
    with a whole artifact). Such an attempt says nothing about interrupts and is repeated, at most
    three times; any other outcome fails at once."""
    late = []
    for attempt in range(3):
        where = tmp_path / f"attempt-{attempt}"
        proc, err = _quantize_then_sigint(where)
        published = (where / "runs" / "out" / "manifest.json").is_file()
        if proc.returncode in (0, -signal.SIGINT) and published and "Traceback" not in err:
            late.append(proc.returncode)
            continue
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert list((where / "runs").iterdir()) == []          # no artifact, no partial or work directory
        assert not (where / "logs").exists()
        return
    pytest.fail(f"in 3 attempts the interrupt always landed after the artifact was published (exit codes {late})")


def test_help_and_readme_list_every_exit_code():
    proc = subprocess.run([sys.executable, "-m", "inferforge", "--help"], capture_output=True, text=True, cwd=REPO)
    codes = re.findall(r"^\s+(\d+)\s{2,}", proc.stdout.split("exit codes:")[1], flags=re.M)
    assert codes == ["0", "1", "2", "3", "130"]
    assert "--debug" in proc.stdout
    import inferforge.cli

    doc = inferforge.cli.__doc__.split("Exit codes:")[1]
    assert re.findall(r"^\s+(\d+)\s", doc, flags=re.M) == ["0", "1", "2", "3", "130"]
    readme = (REPO / "README.md").read_text()
    sentence = re.search(r"Exit codes:(.+?)\.\s", readme, flags=re.S).group(1)
    for code in ("0 success", "1 ", "2 bad input", "3 ", "130 interrupted"):
        assert code in sentence, code

import pytest

from inferforge.cli import main
from tests.conftest import run_cli

COMMANDS = ["optimize", "export", "quantize", "bench", "inspect", "plan", "generate", "explain"]


def test_top_level_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in COMMANDS:
        assert cmd in proc.stdout
    assert "exit codes" in proc.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "example" in out and f"inferforge {cmd}" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_bad_bench_target_syntax_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "somewhere", "--target", "fast"])
    assert info.value.code == 2
    assert "expected BATCH:MS" in capsys.readouterr().err


def test_inspect_of_a_non_artifact_exits_2(tmp_path):
    proc = run_cli("inspect", tmp_path)
    assert proc.returncode == 2
    assert "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


def test_calibration_file_on_a_model_directory_is_refused_not_ignored(tmp_path, capsys):
    cal = tmp_path / "cal.txt"
    cal.write_text("a sentence\n")
    assert main(["quantize", str(tmp_path), "--calibration", str(cal), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--calibration FILE is read by --config" in err and "--onnx --calibration FILE" in err
    assert not (tmp_path / "out").exists()

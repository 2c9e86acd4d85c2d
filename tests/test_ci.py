"""`.ci/run` runs exactly the README's test command as its last command, so the script exits with pytest's
code: any failure, and 5 when no test was collected, fails CI."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    (line,) = [x for x in re.findall(r"^pip install .+$", readme, flags=re.M) if '".[dev]"' in x]
    return line.split("&&")[-1].strip()


def test_ci_runs_the_readme_test_command_last():
    script = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [x.strip() for x in script if x.strip() and not x.strip().startswith("#")]
    assert "set -euo pipefail" in commands
    assert commands[-1] == _readme_test_command() == "pytest"



def test_ci_installs_chromium_and_sets_ci():
    """The HTML report test needs headless Chromium; with CI set it fails instead of skipping when it is missing."""
    script = (REPO / ".ci" / "run").read_text()
    assert "command -v chromium" in script and "apt-get install -y -qq chromium" in script
    assert 'export CI="${CI:-1}"' in script
    assert script.index("apt-get install -y -qq chromium") < script.rindex("\npytest")

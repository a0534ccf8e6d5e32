"""The README's test command is exactly what CI runs (.ci/run), so the two cannot drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in ci if line.startswith("python3 -m venv")]
    assert len(commands) == 1, ".ci/run must hold exactly one install-and-test command line"
    assert "pytest" in commands[0] and "XSEQLOSS_REQUIRE_BACKENDS=all" in commands[0]
    assert commands[0] in readme, "the README must show the exact command .ci/run runs"


def test_readme_has_the_main_job_command():
    readme = (ROOT / "README.md").read_text()
    assert "xseqloss conformance --json" in readme

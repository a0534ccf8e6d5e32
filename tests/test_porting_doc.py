"""docs/porting.md stays complete and executable.

Its examples themselves run as a doctest through pytest's ``--doctest-glob=*.md`` (pyproject.toml); these
tests make sure that stays so, and that the guide covers every preset and every common mistake it
promises, with no example left outside a doctest.
"""

import doctest
import os
import re
import sys

import pytest

import xseqloss as xsl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "porting.md")


@pytest.fixture(scope="module")
def text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def test_the_guide_runs_under_the_projects_pytest_configuration():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert "docs" in cfg["testpaths"]
    assert "--doctest-glob=*.md" in cfg["addopts"].split()
    assert "ELLIPSIS" in cfg["doctest_optionflags"]  # the guide shortens tracebacks with "..."


def test_every_python_block_is_a_doctest(text):
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 20
    for block in blocks:
        assert block.lstrip().startswith(">>>"), block[:200]  # nothing shown that does not run
        # a blank line before the closing fence, or doctest would expect "```" as output
        assert block.endswith("\n\n"), block[-200:]
    examples = doctest.DocTestParser().get_examples(text)
    assert len(examples) >= 80
    assert sum(1 for e in examples if e.exc_msg) >= 8  # the error messages are shown, and checked


def test_every_preset_and_system_has_a_section(text):
    for name in xsl.presets.ALL:
        assert f"presets.{name}" in text, name
    headings = re.findall(r"^##+ (.*)$", text, flags=re.M)
    for system in ("PyTorch", "Keras 3", "optax", "tfa", "Hugging Face", "fairseq"):
        assert any(h.startswith(system) for h in headings), system
    mistakes = ("(N, T, C) where (N, C, T)", "wrong reshape", "Padding without a mask", "output[:, -1]",
                "Softmax before", "Where in the sequence", "Hand-padding a target list", "Flattening a PackedSequence",
                "Shifting by hand", "Packing that re-weights documents")
    for m in mistakes:
        assert any(m in h for h in headings), m
    # the differences the guide promises for each system
    for topic in ("What the mean divides by", "Empty batches", "Smoothing", "Out-of-range labels",
                  "Label dtype", "Label casting", "Negative labels wrap"):
        assert topic in text, topic
    assert 'reduction="per_position"' in text and "xsl.pool(" in text and "did you pass softmax outputs?" in text

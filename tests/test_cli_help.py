"""Every flag says what it does, and the ones with a default say which."""

import argparse

import pytest

from inferforge.cli import build_parser

# Defined by the causal-LM work on `generate` and `quantize --config`, which documents them there.
DOCUMENTED_ELSEWHERE = {("generate", "--prompt"), ("generate", "--max-new-tokens"), ("generate", "--top-k"),
                        ("generate", "--top-p"), ("generate", "--seed"), ("generate", "--kv-cache-dtype"),
                        ("quantize", "--seq-len"), ("quantize", "--num-samples")}
# Flags whose help must state the default value.
STATE_DEFAULT = {("bench", "--batch-sizes"): "1 8", ("bench", "--iterations"): "30", ("bench", "--warmup"): "5",
                 ("bench", "--seq-len"): "128", ("bench", "--percentile"): "p95",
                 ("export", "--calibration-size"): "160", ("export", "--held-out-size"): "320",
                 ("quantize", "--calibration-size"): "160", ("quantize", "--held-out-size"): "320",
                 ("quantize", "--gpu"): "h100", ("explain", "--gpu"): "h100", ("plan", "--kv-cache-dtype"): "bf16"}


def _options():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                yield command, max(action.option_strings, key=len), action


@pytest.mark.parametrize("command, flag, action", [o for o in _options() if o[:2] not in DOCUMENTED_ELSEWHERE],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_has_a_description(command, flag, action):
    assert action.help and len(action.help) > 10, f"{command} {flag} has no description"


@pytest.mark.parametrize("key, default", sorted(STATE_DEFAULT.items()))
def test_defaults_are_stated(key, default):
    (action,) = [a for c, f, a in _options() if (c, f) == key]
    assert f"default {default}" in action.help, f"{key}: {action.help!r}"


def test_top_level_help_documents_debug(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--debug" in out and "130" in out

"""The causal-LM recipe form (`quantize: {config: FORMAT, ...}`) on a tiny Llama: validation, and runs
through `inferforge optimize` that give the same artifact as `inferforge quantize --config`."""

import json
import textwrap

import pytest
import torch

import inferforge
from inferforge.cli import main
from inferforge.errors import RecipeError
from inferforge.optimize.llm_quantize import load_as_transformers
from inferforge.optimize.quantize import Int4WeightOnlyLinear
from inferforge.recipe import (
    LLMQuantizeConfig,
    QuantizeConfig,
    builtin_recipe_path,
    load_recipe,
    recipe_from_dict,
)
from tests.conftest import quantized_layers_as_on_cpu_env, run_cli
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")

# Relative paths: the tests write the recipe next to `tiny/` and `cal.txt`.
RECIPE = textwrap.dedent("""\
    model: tiny
    output: {output}
    steps:
      - quantize:
          config: int4-awq
          calibration: cal.txt
          num_samples: 4
          seq_len: 16
          group_size: 32
          skip: [lm_head]
          gate:
            max_ppl_increase: 5%
            min_top1_agreement: 0.5
""")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-recipe")
    save_word_tokenizer(save_tiny_llama(root / "tiny"))
    save_word_text(root / "cal.txt")
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (root / "neox").mkdir()
    (root / "neox" / "config.json").write_text(json.dumps({"model_type": "gpt_neox",
                                                           "architectures": ["GPTNeoXForCausalLM"]}))
    return root


def write(root, text, name="recipe.yaml"):
    path = root / name
    path.write_text(text)
    return path


def error_of(root, text) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(root, text, "bad.yaml"))
    return str(info.value)


def test_good_recipe_parses_percentages_and_resolves_paths(root):
    recipe = load_recipe(write(root, RECIPE.format(output="out/llama-int4")))
    (step,) = recipe.steps
    assert isinstance(step, LLMQuantizeConfig) and recipe.kind == "causal-lm"
    assert step.gate.max_ppl_increase == pytest.approx(0.05) and step.gate.min_top1_agreement == 0.5
    assert step.calibration == str(root / "cal.txt") and recipe.model == str(root / "tiny")
    assert step.skip == ("lm_head",) and step.auto_skip is False
    assert recipe.name == "llama-int4"                      # no name: the output directory's
    assert "gates" not in recipe.to_dict() and recipe_from_dict(recipe.to_dict()) == recipe


def test_shipped_example_validates():
    recipe = load_recipe(builtin_recipe_path("llama-int4-awq"), check_paths=False)
    (step,) = recipe.steps
    assert (step.config, step.gate.max_ppl_increase, step.auto_skip) == ("int4-awq", 0.02, True)


def test_recipe_run_matches_the_quantize_command(root, tmp_path):
    """`inferforge optimize RECIPE` (a real subprocess) and `inferforge quantize --config` write the
    same quantized weights, quantization.json and metrics; `inferforge.load` rebuilds the model."""
    out = tmp_path / "from-recipe"
    proc = run_cli("optimize", write(root, RECIPE.format(output=out)), "--json", "-q", env=quantized_layers_as_on_cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert manifest["kind"] == "quantized-causal-lm" and manifest["runtime"]["format"] == "int4-awq"
    assert manifest["name"] == "from-recipe" and manifest["recipe"]["steps"][0]["quantize"]["config"] == "int4-awq"
    assert manifest["recipe"]["steps"][0]["quantize"]["gate"]["max_ppl_increase"] == pytest.approx(0.05)
    assert manifest["quantization"]["skipped"] == ["lm_head"] and manifest["quantization"]["calibration_sha256"]
    assert manifest["gate"]["limits"]["min_top1_agreement"] == 0.5 and manifest["passed"]
    assert manifest["checks"][1] | {"measured": None} == {"name": "top-1 agreement (held-out)", "kind": "gate",
                                                         "measured": None, "op": ">=", "limit": 0.5, "passed": True}
    assert manifest["validation"]["tokens"] == 2 * 15       # num_samples // 2 held-out sequences of 16

    cli_out = tmp_path / "from-cli"
    assert main(["quantize", str(root / "tiny"), "--config", "int4-awq", "--calibration", str(root / "cal.txt"),
                 "--num-samples", "4", "--seq-len", "16", "--group-size", "32", "--skip", "lm_head",
                 "--max-ppl-increase", "0.05", "--min-top1-agreement", "0.5", "--output", str(cli_out), "-q"]) == 0
    cli_manifest = json.loads((cli_out / "manifest.json").read_text())
    def model_files(m):   # the reports differ in name, time and duration
        return {k: v for k, v in m["files"].items() if not k.startswith("report.")}

    assert model_files(manifest) == model_files(cli_manifest)     # every model file, weights included, byte for byte
    for key in ("quantization", "validation", "checks", "source"):
        assert manifest[key] == cli_manifest[key], key

    model = load_as_transformers(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4WeightOnlyLinear)
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_as_transformers(cli_out)(ids).logits)
    engine = inferforge.load(out)             # the engine, with AWQ's int4 layers
    assert engine.manifest["recipe"] == manifest["recipe"]
    assert (out / "report.md").is_file() and json.loads((out / "report.json").read_text())["gate"]["enabled"]


def test_missed_gate_exits_1_and_leaves_no_artifact(root, tmp_path, capsys):
    out = tmp_path / "strict"
    text = RECIPE.format(output=out).replace("min_top1_agreement: 0.5", "min_top1_agreement: 100%")
    assert main(["optimize", str(write(root, text, "strict.yaml")), "-q"]) == 1
    err = capsys.readouterr().err
    assert "quantization gate missed: top-1 agreement" in err and "< 100.00%" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []   # no artifact, no staging left behind


@pytest.mark.parametrize("old, new, fragments", [
    ("config: int4-awq", "config: int4-foo",
     ["line 5", "steps[0].quantize.config", "'int4-foo' is not a format", "int8-weight-only, int4-g128, int4-gptq"]),
    ("num_samples: 4", "num_sample: 4", ["line 7", "unknown key 'num_sample'", "did you mean 'num_samples'"]),
    ("seq_len: 16", "per_channel: true",
     ["line 8", "'per_channel' belongs to the ONNX int8 quantize step", "this is the causal-LM quantize step"]),
    ("max_ppl_increase: 5%", "max_ppl_increase: 5 percent",
     ["line 12", "gate.max_ppl_increase", "expected number or percentage such as '2%' or null"]),
    ("max_ppl_increase: 5%", "max_ppl_increase: 200%", ["gate.max_ppl_increase", "between 0 and 1"]),
    ("max_ppl_increase: 5%", "max_ppl_incrase: 0.05", ["line 12", "did you mean 'max_ppl_increase'"]),
    ("min_top1_agreement: 0.5", "min_top1_agreement: true", ["gate.min_top1_agreement", "expected number"]),
    ("      gate:\n        max_ppl_increase: 5%\n        min_top1_agreement: 0.5\n",
     "      gate: {max_ppl_increase: null, min_top1_agreement: null}\n",
     ["gate needs at least one of max_ppl_increase, min_top1_agreement, max_kl", "write gate: none"]),
    ("      gate:\n        max_ppl_increase: 5%\n        min_top1_agreement: 0.5\n", "      gate: null\n",
     ["line 11", "gate must not be null", "gate: none to turn it off"]),
    ("      gate:\n        max_ppl_increase: 5%\n        min_top1_agreement: 0.5\n", "      gate: disabled\n",
     ["gate must be a mapping of limits, 'default' or 'none'"]),
    ("calibration: cal.txt", "calibration: cal.txt\n      max_float_share: 150%",
     ["max_float_share must be between 0 and 1"]),
    ("      calibration: cal.txt\n", "", ["config int4-awq needs calibration text: add calibration: FILE"]),
    ("calibration: cal.txt", "calibration: missing.txt", ["line 6", "steps[0].quantize.calibration", "file not found"]),
    ("skip: [lm_head]", "auto_skip: true\n      skip: lm_head", ["steps[0].quantize.skip", "expected a list"]),
    ("model: tiny", "model: bert", ["line 1", "holds BertModel, not a causal LM", "drop 'config'"]),
    ("model: tiny", "model: all-MiniLM-L6-v2", ["is not a checkpoint directory"]),
    ("model: tiny", "model: neox", ["line 1", "is a 'gpt_neox' causal LM", "llama, mistral, qwen2"]),
    ("steps:\n", "gates: {min_cosine: 0.99}\nsteps:\n",
     ["line 3", "'gates' belongs to the ONNX encoder path", "gate: {max_ppl_increase: 2%"]),
    ("steps:\n", "steps:\n  - export\n", ["has the one step 'quantize'"]),
])
def test_validation_errors(root, old, new, fragments):
    text = RECIPE.format(output="out/x")
    assert old in text
    msg = error_of(root, text.replace(old, new))
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_auto_skip_needs_the_gate_on(root):
    text = RECIPE.format(output="out/x").split("      gate:")[0] + "      auto_skip: true\n      gate: none\n"
    assert "auto_skip keeps layers in float until the gate passes; it cannot run with gate: none" in error_of(root, text)


def test_the_gate_is_on_unless_the_recipe_says_none(root):
    """Item 3, recipe form: no gate key gives the format's default gate; a partial gate keeps the other default;
    only `gate: none` turns it off, and then no calibration text is needed."""
    base = RECIPE.format(output="out/x").split("      gate:")[0]
    (step,) = load_recipe(write(root, base)).steps
    assert (step.gate.max_ppl_increase, step.gate.min_top1_agreement) == (0.15, 0.9)        # int4-awq's defaults
    (step,) = load_recipe(write(root, base + "      gate: {max_ppl_increase: 3%}\n")).steps
    assert (step.gate.max_ppl_increase, step.gate.min_top1_agreement) == (pytest.approx(0.03), 0.9)
    int8 = base.replace("config: int4-awq", "config: int8-weight-only").replace("      calibration: cal.txt\n", "")
    assert "the gate (on by default) compares with the original on held-out text: add calibration: FILE" in \
        error_of(root, int8)
    (step,) = load_recipe(write(root, int8 + "      gate: none\n      max_float_share: 20%\n")).steps
    assert step.gate == "none" and step.max_float_share == pytest.approx(0.2)
    recipe = load_recipe(write(root, int8 + "      gate: none\n"))
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_recipe_without_a_gate_key_runs_the_default_gate_and_float_share(root, tmp_path, capsys):
    out = tmp_path / "default-gate"
    text = (RECIPE.format(output=out).split("      gate:")[0].replace("config: int4-awq", "config: int8-weight-only")
            .replace("skip: [lm_head]", "skip: [lm_head, '*.mlp.*', '*.o_proj']"))      # 9 of 15 layers in float
    assert main(["optimize", str(write(root, text, "default.yaml")), "-q"]) == 1
    err = capsys.readouterr().err
    assert "not quantized enough" in err and "or allow more with max_float_share" in err and not out.exists()
    assert main(["optimize", str(write(root, text + "      max_float_share: 60%\n", "default.yaml")), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gate"]["enabled"] and manifest["gate"]["limits"]["max_ppl_increase"] == 0.05
    assert manifest["recipe"]["steps"][0]["quantize"]["gate"]["min_top1_agreement"] == 0.9
    assert manifest["quantization"]["float_share"] == pytest.approx(9 / 15)


def test_causal_lm_key_in_the_onnx_quantize_step_points_at_config(root):
    text = "name: x\nmodel: all-MiniLM-L6-v2\nsteps:\n  - export\n  - quantize: {calibration: cal.txt}\n"
    msg = error_of(root, text)
    assert "line 5" in msg and "'calibration' belongs to the causal-LM quantize step" in msg
    assert "add config: FORMAT (int8-weight-only" in msg
    assert isinstance(load_recipe(write(root, text.replace("{calibration: cal.txt}", "{}"))).steps[1], QuantizeConfig)


def test_cli_bad_llm_recipe_exits_2_without_traceback(root, capsys):
    text = RECIPE.format(output="out/x").replace("config: int4-awq", "config: int3")
    assert main(["optimize", str(write(root, text, "bad.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "'int3' is not a format" in err and "Traceback" not in err

"""Weight-only quantization of PyTorch models: SQNR floors, in-place replacement, skips, errors."""

import pytest
import torch
from torch import nn

from inferforge.errors import UserInputError
from inferforge.optimize import Int4WeightOnly, Int8WeightOnly, quantize, sqnr_db
from inferforge.optimize.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from tests.factories_llama import tiny_llama_config


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.02)      # Gaussian weights, as the floors are stated for
    return model.eval()


@pytest.mark.parametrize("config, floor", [(Int8WeightOnly(), 35.0), (Int4WeightOnly(group_size=128), 15.0),
                                           (Int4WeightOnly(group_size=32, symmetric=True), 15.0)],
                         ids=["int8", "int4-g128", "int4-g32-sym"])
def test_weight_sqnr_floors_and_outputs(config, floor):
    model = mlp()
    x = torch.randn(8, 256)
    with torch.no_grad():
        want = model(x)
    report = quantize(model, config)
    assert set(report.layers) == {"0", "2"} and all(v >= floor for v in report.layers.values()), report.layers
    kinds = {Int8WeightOnly: Int8WeightOnlyLinear, Int4WeightOnly: Int4WeightOnlyLinear}
    assert isinstance(model[0], kinds[type(config)]) and isinstance(model[2], kinds[type(config)])
    with torch.no_grad():
        got = model(x)
    assert sqnr_db(want, got) >= floor - 3           # the output keeps about the weights' SQNR


def test_int8_beats_int4_and_smaller_groups_beat_larger():
    w8 = min(quantize(mlp(), Int8WeightOnly()).layers.values())
    g32 = min(quantize(mlp(), Int4WeightOnly(group_size=32)).layers.values())
    g128 = min(quantize(mlp(), Int4WeightOnly(group_size=128)).layers.values())
    assert w8 > g32 > g128


def test_quantized_layer_computes_x_times_dequantized_weight():
    model = mlp()
    quantize(model, Int4WeightOnly(group_size=64))
    layer = model[0]
    x = torch.randn(3, 256)
    want = x @ layer.dequantized_weight().T + layer.bias
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)


def test_tiny_llama_with_skips():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    report = quantize(model, Int8WeightOnly(skip=("lm_head", "*.mlp.down_proj")))
    assert report.skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert len(report.layers) == 2 * 6 and isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        got = model(ids).logits
    assert sqnr_db(want, got) > 25


def test_bad_configs_are_clear():
    with pytest.raises(UserInputError, match="group_size must be a power of two >= 16, got 100"):
        Int4WeightOnly(group_size=100)
    with pytest.raises(UserInputError, match="method 'hqq' is not available; supported: 'rtn', 'gptq', 'awq'"):
        Int4WeightOnly(method="hqq")
    odd = nn.Sequential(nn.Linear(96, 32))
    with pytest.raises(UserInputError, match=r"0: in_features \(96\) is not a multiple of the group size \(64\)"):
        quantize(odd, Int4WeightOnly(group_size=64))
    with pytest.raises(UserInputError, match="no quantization handler for str"):
        quantize(odd, "int8")


def correlated_inputs(n, k, seed):
    """Inputs whose features are correlated (a few directions carry most of the energy), as real
    activations are; one fixed mixing basis, fresh samples per seed."""
    basis = torch.randn(k, k, generator=torch.Generator().manual_seed(1234))
    strength = torch.logspace(1, -2, k)
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * strength) @ basis


def linear_output_sqnr(inputs, configs: dict, weight_std: float | None = None) -> dict:
    """Output SQNR on held-out inputs of one seeded Linear(256, 128), quantized with each config
    (given the calibration batches when it uses them)."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    if weight_std is not None:
        nn.init.normal_(layer.weight, std=weight_std)
    calibration, held_out = inputs
    with torch.no_grad():
        want = layer(held_out)
    scores = {}
    for key, config in configs.items():
        model = nn.Sequential(nn.Linear(256, 128))
        model[0].load_state_dict(layer.state_dict())
        uses_data = getattr(config, "method", "rtn") != "rtn" or hasattr(config, "smoothquant_alpha")
        quantize(model, config, calibration=calibration if uses_data else None)
        with torch.no_grad():
            scores[key] = sqnr_db(want, model(held_out))
    return scores


def int4_output_sqnr(inputs, methods) -> dict[str, float]:
    """Output SQNR of a Gaussian Linear(256, 128) quantized with each int4 method (group 64)."""
    configs = {m: Int4WeightOnly(group_size=64, method=m) for m in methods}
    return linear_output_sqnr(inputs, configs, weight_std=0.05)


def test_gptq_beats_rtn_on_the_same_layer_and_data():
    inputs = ([correlated_inputs(256, 256, seed) for seed in range(4)], correlated_inputs(512, 256, 99))
    errors = int4_output_sqnr(inputs, ("rtn", "gptq"))
    assert errors["gptq"] > errors["rtn"] + 1.0, errors


def test_gptq_needs_calibration_and_rtn_refuses_it():
    with pytest.raises(UserInputError, match="needs calibration data"):
        quantize(mlp(), Int4WeightOnly(method="gptq"))
    with pytest.raises(UserInputError, match="uses no calibration data"):
        quantize(mlp(), Int8WeightOnly(), calibration=[torch.randn(2, 256)])


@pytest.mark.parametrize("config", [Int8WeightOnly(skip=("lm_head",)), Int4WeightOnly(group_size=32), "w8a8", "fp8-row"],
                         ids=["int8", "int4", "w8a8", "fp8-row"])
def test_save_load_round_trip_is_bit_exact(tmp_path, config):
    from transformers import LlamaForCausalLM

    from inferforge.optimize import FP8, W8A8
    from inferforge.optimize.quantize import load_quantized, save_quantized

    torch.manual_seed(0)
    cfg = tiny_llama_config(tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    if config == "w8a8":
        report = quantize(model, W8A8(), calibration=[torch.randint(3, 256, (2, 16))])
    elif config == "fp8-row":
        report = quantize(model, FP8(granularity="row"))
    else:
        report = quantize(model, config)
    save_quantized(model, tmp_path / "q", report)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.safetensors", "quantization.json"]
    torch.manual_seed(1)
    fresh = load_quantized(LlamaForCausalLM(cfg).eval(), tmp_path / "q")   # different random init underneath
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_load_into_the_wrong_architecture(tmp_path):
    from inferforge.optimize.quantize import load_quantized, save_quantized

    model = mlp()
    save_quantized(model, tmp_path / "q", quantize(model, Int8WeightOnly()))
    with pytest.raises(UserInputError, match=r"layer '0' is not an nn.Linear\(256, 512\)"):
        load_quantized(nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 256)), tmp_path / "q")


def outlier_inputs(n, seed):
    """Activations with a few planted outlier channels (30-60x the rest), as LayerNorm outputs have."""
    x = torch.randn(n, 256, generator=torch.Generator().manual_seed(seed))
    x[:, [3, 77, 200]] *= torch.tensor([30.0, 60.0, 45.0])
    return x


def outlier_split():
    return [outlier_inputs(128, s) for s in range(3)], outlier_inputs(256, 42)


def test_smoothquant_beats_plain_w8a8_on_outlier_channels():
    from inferforge.optimize import W8A8

    scores = linear_output_sqnr(outlier_split(), {a: W8A8(smoothquant_alpha=a) for a in (0.0, 0.5)})
    assert scores[0.5] > scores[0.0] + 3, scores        # alpha 0 is plain per-token W8A8
    assert scores[0.5] > 25


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_fp8_emulation_matches_e4m3_casts(granularity):
    from inferforge.optimize import FP8

    model = mlp()
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = model(x)
    report = quantize(model, FP8(granularity=granularity))
    assert min(report.layers.values()) > 25
    layer = model[0]
    # The same computation spelled out with torch's own e4m3 casts.
    amax = x.abs().amax() if granularity == "tensor" else x.abs().amax(dim=1, keepdim=True)
    xs = (amax / 448).clamp(min=1e-12)
    w = layer.weight_fp8.float() * (layer.w_scale if granularity == "tensor" else layer.w_scale[:, None])
    expected = ((x / xs).to(torch.float8_e4m3fn).float() * xs) @ w.T + layer.bias
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        assert sqnr_db(want, model(x)) > 20


def test_w8a8_and_fp8_configs_validate():
    from inferforge.optimize import FP8, W8A8

    with pytest.raises(UserInputError, match="smoothquant_alpha must be in"):
        W8A8(smoothquant_alpha=2)
    with pytest.raises(UserInputError, match="granularity must be 'tensor' or 'row'"):
        FP8(granularity="block")
    with pytest.raises(UserInputError, match="needs calibration data"):
        quantize(mlp(), W8A8())


def _tiny_lm(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_lm_metrics_and_gate():
    from inferforge.errors import GateFailed
    from inferforge.optimize.lm_eval import LMGate, compare_lms

    held_out = [torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    same = compare_lms(_tiny_lm(), _tiny_lm(), held_out)
    assert same["ppl_increase"] == pytest.approx(0, abs=1e-9) and same["top1_agreement"] == 1 and same["kl"] < 1e-9
    model = _tiny_lm()
    report = quantize(model, Int8WeightOnly(), gate=LMGate(max_ppl_increase=0.05, min_top1_agreement=0.9),
                      eval_data=held_out)
    assert report.metrics["top1_agreement"] > 0.9 and not report.gate_failures
    with pytest.raises(GateFailed, match=r"top-1 agreement .* < 100.00%; pass auto_skip=True"):
        quantize(_tiny_lm(), Int4WeightOnly(group_size=32), gate=LMGate(min_top1_agreement=1.0), eval_data=held_out)


def test_auto_skip_restores_the_most_sensitive_layers_until_the_gate_passes():
    from inferforge.optimize.lm_eval import LMGate

    held_out = [torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    model = _tiny_lm()
    plain = quantize(_tiny_lm(), Int4WeightOnly(group_size=32))
    report = quantize(model, Int4WeightOnly(group_size=32), gate=LMGate(max_kl=0.5 * _kl_of(plain, held_out)),
                      eval_data=held_out, auto_skip=True)
    assert report.auto_skipped and not report.gate_failures
    worst_first = [n for n, _ in sorted(plain.layers.items(), key=lambda kv: kv[1])]
    assert report.auto_skipped == worst_first[:len(report.auto_skipped)]
    for name in report.auto_skipped:
        assert isinstance(model.get_submodule(name), nn.Linear)


def _kl_of(report, held_out):
    from inferforge.optimize.lm_eval import compare_lms

    model = _tiny_lm()
    quantize(model, report.config)
    return compare_lms(_tiny_lm(), model, held_out)["kl"]


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_w8a8_observers_run_and_stay_accurate(observer):
    from inferforge.optimize import W8A8

    assert linear_output_sqnr(outlier_split(), {observer: W8A8(observer=observer)})[observer] > 25
    with pytest.raises(UserInputError, match="observer must be one of"):
        W8A8(observer="max")


def test_awq_beats_rtn_when_a_few_input_channels_carry_large_activations():
    scores = int4_output_sqnr(outlier_split(), ("rtn", "awq"))
    assert scores["awq"] > scores["rtn"] + 1.0, scores


def test_awq_round_trip(tmp_path):
    from inferforge.optimize.quantize import load_quantized, save_quantized

    model = nn.Sequential(nn.Linear(256, 64))
    report = quantize(model, Int4WeightOnly(group_size=32, method="awq"), calibration=[outlier_inputs(64, 0)])
    assert model[0].input_scale is not None            # AWQ divides the input by its per-channel scales
    save_quantized(model, tmp_path / "q", report)
    fresh = load_quantized(nn.Sequential(nn.Linear(256, 64)), tmp_path / "q")
    x = outlier_inputs(8, 1)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_encoder_gate_on_a_bert():
    from inferforge.errors import GateFailed
    from inferforge.optimize.lm_eval import EncoderGate
    from tests.factories import tiny_bert

    model, tokenizer = tiny_bert()
    held_out = [dict(tokenizer(["a short sentence", "another, somewhat longer sentence here"], padding=True,
                               return_tensors="pt"))]
    report = quantize(model, Int8WeightOnly(), gate=EncoderGate(min_cosine=0.99), eval_data=held_out)
    assert report.metrics["sequences"] == 2 and report.metrics["min_cosine"] > 0.99
    bert, _ = tiny_bert()
    with pytest.raises(GateFailed, match=r"min cosine .* < 1.0000"):
        quantize(bert, Int4WeightOnly(group_size=32), gate=EncoderGate(min_cosine=1.0), eval_data=held_out)

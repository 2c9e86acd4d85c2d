"""The hidden-state loss's settings: per-token cosine instead of MSE, and the last layer only."""

import contextlib
import math

import pytest
import torch

from inferforge.optimize.distill import DistillConfig
from inferforge.optimize.distill_data import collate
from inferforge.optimize.distill_losses import hidden_pairs, token_cosine, token_mse
from inferforge.optimize.distill_student import StudentWithHeads, build_student
from inferforge.optimize.distill_teacher_cache import TeacherCache
from inferforge.optimize.distill_train import sample_losses
from tests.distill_helpers import tiny_bert_teacher

TEXTS = [[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 2088, 102], [101, 2088, 102], [101, 7592, 2023, 2088, 102]]


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    return tiny_bert_teacher(tmp_path_factory.mktemp("bert"), layers=3)


def test_token_cosine_matches_a_hand_computation_and_ignores_padding_and_scale():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, -7.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 3.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])   # the third token is padding
    want = ((1 - 0.0) + (1 - 1.0)) / 2
    assert token_cosine(student, teacher, mask).item() == pytest.approx(want, abs=1e-6)
    angled = torch.tensor([[[math.cos(0.3), math.sin(0.3)]]])
    got = token_cosine(angled * 10, torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1]]))
    assert got.item() == pytest.approx(1 - math.cos(0.3), rel=1e-5)   # scale-blind, unlike the MSE
    assert token_mse(angled * 10, torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1]])).item() > 1


def test_hidden_pairs_name_the_student_and_teacher_layers():
    assert hidden_pairs([0, 3, 5]) == [(0, 0), (1, 3), (2, 5)]
    assert hidden_pairs([0, 3, 5], "last") == [(2, 5)]


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_last_layer_loss_compares_only_the_last_layer_cached_or_not(bert_teacher, hidden_loss):
    config = DistillConfig(layers=(0, 2), hidden_weight=0.5, hidden_loss=hidden_loss, hidden_layers="last")
    student, plan = build_student(bert_teacher, config)
    with torch.no_grad():   # move the student away from its teacher layers, so every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = StudentWithHeads(student, "encoder", 32, want_hidden=True).eval()
    layers = [j for _, j in hidden_pairs(plan["layer_map"], "last")]
    cache = TeacherCache.build(bert_teacher.model, TEXTS, 0, "cpu", contextlib.nullcontext, layers=layers)
    assert len(cache.hidden[0]) == 1   # the cache keeps only the teacher layer the loss reads
    batch = [2, 0, 1]
    ids, mask = collate([TEXTS[i] for i in batch], 0)
    live = sample_losses(module, bert_teacher.model, "encoder", ids, mask, config, 0.5, plan["layer_map"],
                         contextlib.nullcontext)
    cached = sample_losses(module, bert_teacher.model, "encoder", ids, mask, config, 0.5, plan["layer_map"],
                           contextlib.nullcontext, cache.targets(batch, ids.shape[1]))
    torch.testing.assert_close(cached["hidden"], live["hidden"], rtol=2e-3, atol=1e-5)
    with torch.no_grad():
        s = module(ids, mask)["hidden"][-1]
        t = bert_teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2 + 1]
    by_hand = 0.5 * (token_cosine if hidden_loss == "cosine" else token_mse)(s, t, mask)
    torch.testing.assert_close(live["hidden"], by_hand, rtol=1e-5, atol=1e-6)
    every = sample_losses(module, bert_teacher.model, "encoder", ids, mask,
                          DistillConfig(layers=(0, 2), hidden_weight=0.5, hidden_loss=hidden_loss), 0.5,
                          plan["layer_map"], contextlib.nullcontext)
    assert not torch.allclose(every["hidden"], live["hidden"])   # "all" averages layer 0's term in too


@pytest.mark.parametrize("kwargs, message", [({"hidden_loss": "l1"}, "hidden_loss must be one of mse, cosine"),
                                             ({"hidden_layers": "first"}, "hidden_layers must be one of all, last")])
def test_bad_hidden_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(layers=(0,), **kwargs)


def test_hidden_settings_at_their_defaults_leave_the_resume_fingerprint_as_before():
    settings = DistillConfig(layers=(0, 1)).run_settings("encoder")
    assert not {"hidden_loss", "hidden_layers"} & set(settings)
    changed = DistillConfig(layers=(0, 1), hidden_loss="cosine", hidden_layers="last").run_settings("encoder")
    assert changed["hidden_loss"] == "cosine" and changed["hidden_layers"] == "last"


def test_the_hidden_flags_reach_the_config_and_the_recipe_step():
    from inferforge.cli import build_parser
    from inferforge.distill_cli import config_from_args
    from inferforge.recipe import DistillStepConfig

    args = build_parser().parse_args(["distill", "t", "--layers", "0,3,5", "--data", "x.txt", "-o", "o",
                                      "--hidden-loss", "cosine", "--hidden-layers", "last"])
    config = config_from_args(args)
    assert config.hidden_loss == "cosine" and config.hidden_layers == "last"
    plain = config_from_args(build_parser().parse_args(["distill", "t", "--layers", "0", "--data", "x.txt", "-o", "o"]))
    assert plain.hidden_loss == "mse" and plain.hidden_layers == "all"
    step = DistillStepConfig(data=("x.txt",), layers=(0, 1), hidden_loss="cosine", hidden_layers="last")
    assert step.distill_config().hidden_loss == "cosine" and step.distill_config().hidden_layers == "last"
    with pytest.raises(ValueError, match="hidden_layers must be one of"):
        DistillStepConfig(data=("x.txt",), layers=(0, 1), hidden_layers="middle")


def test_a_cached_teacher_gives_the_live_teachers_last_layer_loss_in_a_real_run(tmp_path):
    """distill() end to end: with hidden_layers "last" the cache must hold the last pair's teacher layer
    (not layer_map's first), so the first step's hidden loss is the one of running the teacher."""
    import dataclasses

    from inferforge.optimize.distill import distill
    from tests.distill_helpers import DOCS, save_tiny_bert

    teacher = save_tiny_bert(tmp_path / "bert", layers=3)
    base = DistillConfig(layers=(0, 2), steps=1, batch_size=8, max_length=24, eval_every=0, save_every=1,
                         seed=1, dropout=0.0, hidden_weight=1.0, hidden_loss="cosine", hidden_layers="last")

    def first_hidden_loss(cache_teacher):
        history = distill(str(teacher), None, [DOCS], dataclasses.replace(base, cache_teacher=cache_teacher)).history
        return next(r for r in history if "loss_hidden" in r)["loss_hidden"]

    live, cached = first_hidden_loss(False), first_hidden_loss(True)
    assert live > 0 and cached == pytest.approx(live, rel=1e-2)

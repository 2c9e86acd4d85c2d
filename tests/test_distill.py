"""Distillation building blocks: student init, losses, data order, config checks (fast, in-process)."""

import contextlib
import math

import numpy as np
import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.optimize.distill import DistillConfig
from inferforge.optimize.distill_data import load_distill_data, rank_share, step_indices
from inferforge.optimize.distill_losses import kl_divergence, masked_mean_pool
from inferforge.optimize.distill_student import StudentWithHeads, build_student, evenly_spaced, load_teacher
from inferforge.optimize.distill_train import lr_factor, sample_losses, schedule_step
from tests.distill_helpers import save_tiny_bert, tiny_bert_teacher
from tests.factories_llama import save_tiny_llama, save_word_tokenizer


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    return tiny_bert_teacher(tmp_path_factory.mktemp("bert"), layers=3)


def test_layer_selection_copies_the_chosen_teacher_layers_exactly(bert_teacher):
    student, plan = build_student(bert_teacher, DistillConfig(layers=(0, 2)))
    assert plan["layer_map"] == [0, 2] and plan["num_layers"] == 2 and plan["copied_tensors"] == plan["total_tensors"]
    teacher_sd, student_sd = bert_teacher.model.state_dict(), student.state_dict()
    for name, tensor in student_sd.items():
        origin = name.replace("encoder.layer.1.", "encoder.layer.2.")
        assert torch.equal(tensor, teacher_sd[origin]), name
    # Each student layer computes exactly what its teacher layer computes.
    student.eval()
    hidden = torch.randn(2, 5, 32)
    for i, j in enumerate((0, 2)):
        assert torch.equal(student.encoder.layer[i](hidden)[0], bert_teacher.model.encoder.layer[j](hidden)[0])
    assert not torch.equal(student.encoder.layer[1](hidden)[0], bert_teacher.model.encoder.layer[1](hidden)[0])


def test_keeping_every_layer_reproduces_the_teacher(bert_teacher):
    student, _ = build_student(bert_teacher, DistillConfig(layers=(0, 1, 2)))
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        got = student.eval()(input_ids=ids).last_hidden_state
        want = bert_teacher.model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)


def test_every_other_and_evenly_spaced_layer_maps(bert_teacher):
    _, plan = build_student(bert_teacher, DistillConfig(layers="every-other"))
    assert plan["layer_map"] == [0, 2]
    assert evenly_spaced(6, 3) == (1, 3, 5) and evenly_spaced(12, 4) == (2, 5, 8, 11) and evenly_spaced(2, 1) == (1,)


def test_narrower_student_gets_a_projection(bert_teacher):
    student, plan = build_student(bert_teacher, DistillConfig(num_layers=1, hidden_size=16))
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 1
    assert plan["init"].startswith("partly") or plan["init"] == "random"
    module = StudentWithHeads(student, "encoder", 32, want_hidden=True)
    out = module(torch.tensor([[101, 2023, 102]]), torch.tensor([[1, 1, 1]]))
    assert out["pooled"].shape == (1, 32) and out["hidden"][0].shape == (1, 3, 32)


def test_llama_layer_selection_renumbers_the_kept_layers(tmp_path):
    save_tiny_llama(tmp_path, num_hidden_layers=3)
    save_word_tokenizer(tmp_path)
    teacher = load_teacher(tmp_path)
    assert teacher.kind == "decoder"
    student, plan = build_student(teacher, DistillConfig(layers=(2,)))
    assert plan["layer_map"] == [2] and student.model.layers[0].self_attn.layer_idx == 0
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.model.lm_head.weight)


def test_layer_out_of_range_is_a_user_error(bert_teacher):
    with pytest.raises(UserInputError, match="layer 3 is out of range: the teacher has 3 layers"):
        build_student(bert_teacher, DistillConfig(layers=(0, 3)))


def test_one_step_lowers_the_loss_on_a_fixed_batch(bert_teacher):
    config = DistillConfig(num_layers=1, hidden_size=16, hidden_weight=0.5)   # random init: a large loss
    student, plan = build_student(bert_teacher, config)
    module = StudentWithHeads(student, "encoder", 32, want_hidden=True).eval()   # no dropout: a fixed function
    ids = torch.tensor([[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).long()

    def loss():
        parts = sample_losses(module, bert_teacher.model, "encoder", ids, mask, config, 0.5, plan["layer_map"],
                              contextlib.nullcontext)
        return sum(parts.values()).mean()

    before = loss()
    assert before.item() > 0
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_kl_with_temperature_matches_a_hand_computation():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.5, 1.0], [3.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])   # the second position is padding

    def softmax(xs, t):
        e = [math.exp(x / t) for x in xs]
        return [v / sum(e) for v in e]

    for t in (1.0, 2.0, 4.0):
        p, q = softmax([2.0, 0.5, 1.0], t), softmax([1.0, 2.0, 0.5], t)
        want = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        got = kl_divergence(student, teacher, mask, temperature=t)
        assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-6)
    assert kl_divergence(teacher, teacher, mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(masked_mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_held_out_split_is_seeded_disjoint_and_excludes_validation_texts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"text {i}" for i in range(50)) + "\ntext 3\n\n")
    a = load_distill_data([path], held_out_share=0.2, seed=1, exclude=["text 7"])
    b = load_distill_data([path], held_out_share=0.2, seed=1, exclude=["text 7"])
    c = load_distill_data([path], held_out_share=0.2, seed=2, exclude=["text 7"])
    assert a == b and a.held_out != c.held_out
    assert len(a.held_out) == 10 and len(a.train) == 39 and a.excluded == 1
    assert not set(a.train) & set(a.held_out) and "text 7" not in a.train + a.held_out
    assert a.files[0]["texts"] == 51 and len(a.files[0]["sha256"]) == 64


def test_empty_data_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserInputError, match=r"--data .*empty.txt: no text \(empty file\)"):
        load_distill_data([tmp_path / "empty.txt"], held_out_share=0.1, seed=0)


def test_batch_order_is_a_pure_function_of_seed_and_step_and_ranks_share_it():
    first = [step_indices(s, seed=3, n=10, batch_size=4)[2].tolist() for s in range(5)]
    again = [step_indices(s, seed=3, n=10, batch_size=4)[2].tolist() for s in (3, 4, 0, 1, 2)]
    assert [first[i] for i in (3, 4, 0, 1, 2)] == again
    # 2 steps per epoch (the partial batch of 2 is dropped); each epoch visits distinct texts.
    assert step_indices(2, seed=3, n=10, batch_size=4)[:2] == (1, 0)
    assert len(set(first[0] + first[1])) == 8
    batch = np.array(first[0])
    assert sorted(rank_share(batch, 0, 2).tolist() + rank_share(batch, 1, 2).tolist()) == sorted(first[0])


def test_cached_teacher_targets_give_the_losses_of_running_the_teacher(bert_teacher):
    from inferforge.optimize.distill_data import collate
    from inferforge.optimize.distill_teacher_cache import TeacherCache

    config = DistillConfig(layers=(0, 2), hidden_weight=0.5)
    student, plan = build_student(bert_teacher, config)
    module = StudentWithHeads(student, "encoder", 32, want_hidden=True).eval()
    texts = [[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 2088, 102], [101, 2088, 102], [101, 7592, 2023, 2088, 102]]
    cache = TeacherCache.build(bert_teacher.model, texts, 0, "cpu", contextlib.nullcontext, layers=plan["layer_map"])
    for batch in ([1, 3], [2, 0, 1]):   # batched with other texts than in the cache, in another order
        ids, mask = collate([texts[i] for i in batch], 0)
        live = sample_losses(module, bert_teacher.model, "encoder", ids, mask, config, 0.5, plan["layer_map"],
                             contextlib.nullcontext)
        cached = sample_losses(module, bert_teacher.model, "encoder", ids, mask, config, 0.5, plan["layer_map"],
                               contextlib.nullcontext, cache.targets(batch, ids.shape[1]))
        assert sorted(live) == sorted(cached) == ["embedding", "hidden"]
        for name in live:
            torch.testing.assert_close(cached[name], live[name], rtol=2e-3, atol=1e-4)
        assert float(live["hidden"].detach().min()) > 0   # the layers differ from the student's: a non-trivial check
    pooled_only = TeacherCache.build(bert_teacher.model, texts, 0, "cpu", contextlib.nullcontext)
    assert pooled_only.hidden is None and "hidden" not in pooled_only.targets([0, 1], 6)
    torch.testing.assert_close(pooled_only.pooled, cache.pooled)


def test_length_grouped_batches_visit_every_text_once_and_pad_less():
    lengths = np.random.default_rng(1).integers(3, 100, size=1003).tolist()
    spread = {}
    for grouped in (False, True):
        kw = {"lengths": lengths} if grouped else {}
        batches = [step_indices(s, seed=5, n=1003, batch_size=8, **kw)[2].tolist() for s in range(125)]
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == 1000          # one epoch: each text once, the last 3 dropped
        # padding: tokens of the longest text in each batch, summed
        spread[grouped] = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        again = [step_indices(s, seed=5, n=1003, batch_size=8, **kw)[2].tolist() for s in (124, 0, 60)]
        assert again == [batches[124], batches[0], batches[60]]
    assert spread[True] < 0.7 * spread[False]
    # batches are not simply sorted through the epoch: the first batches are of mixed lengths
    firsts = [max(lengths[i] for i in step_indices(s, seed=5, n=1003, batch_size=8, lengths=lengths)[2])
              for s in range(10)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # a new epoch regroups
    assert (step_indices(125, seed=5, n=1003, batch_size=8, lengths=lengths)[2].tolist()
            != step_indices(0, seed=5, n=1003, batch_size=8, lengths=lengths)[2].tolist())


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.001


def test_time_driven_schedule_follows_the_budget_when_it_is_further_along_than_the_steps():
    assert schedule_step(10, 100, None) == 10                 # the step-driven schedule
    assert schedule_step(10, 100, 0.5) == 50                  # half the budget gone after 10 of 100 steps
    assert schedule_step(60, 100, 0.5) == 60                  # the steps are further along
    assert schedule_step(10, 100, 1.7) == 99                  # past the budget: the last step's rate
    assert lr_factor(schedule_step(3, 100, 0.999), 100, 0.1) < 0.001 < lr_factor(3, 100, 0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": (0, 0)}, "twice"), ({"layers": (3, 1)}, "increasing"), ({"layers": "odd"}, "every-other"),
    ({"layers": (0,), "num_layers": 2}, "not both"), ({"hidden_size": 16}, "needs num_layers"),
    ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"), ({"held_out_share": 1.0}, "held_out_share"),
    ({"min_top1_agreement": 1.5}, "min_top1_agreement"), ({"steps": 0}, "steps"),
    ({"lr_schedule": "time"}, "set max_minutes too"), ({"lr_schedule": "epochs", "max_minutes": 1}, "lr_schedule")])
def test_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)


def test_student_config_with_another_vocabulary_is_refused(bert_teacher, tmp_path):
    save_tiny_bert(tmp_path / "student", layers=1, vocab_size=1000)
    with pytest.raises(UserInputError, match="vocab_size 1000 differs from the teacher's 30522"):
        build_student(bert_teacher, DistillConfig(), tmp_path / "student")


def _accumulated_gradient(teacher, config, token_ids, *, world=1, module=None):
    """The gradient one step adds (dropout off), by parameter name."""
    from inferforge.optimize.distill_train import accumulate_gradients

    if module is None:
        student, _ = build_student(teacher, config)
        module = StudentWithHeads(student, "encoder", 32, want_hidden=True).eval()
    micro = [[token_ids[i] for i in part] for part in np.array_split(np.arange(len(token_ids)), config.grad_accum)]
    totals = accumulate_gradients(module, teacher.model, "encoder", micro, 0, config, 0.5, [0], world=world)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, totals


def test_accumulated_micro_batches_give_the_whole_batch_gradient(bert_teacher):
    ids = [[101, 2023, 2003, 1037, 102], [101, 7592, 102], [101, 2088, 2003, 2312, 1012, 102], [101, 2023, 102]]
    one, totals_one = _accumulated_gradient(bert_teacher, DistillConfig(layers=(0,), batch_size=4, grad_accum=1), ids)
    two, totals_two = _accumulated_gradient(bert_teacher, DistillConfig(layers=(0,), batch_size=4, grad_accum=2), ids)
    assert one.keys() == two.keys() and sum(float(g.abs().sum()) for g in one.values()) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    assert totals_one.keys() == totals_two.keys() == {"embedding", "hidden"}
    assert totals_two["embedding"] == pytest.approx(totals_one["embedding"], rel=1e-5)

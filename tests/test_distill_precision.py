"""Distillation's `freeze_embeddings`, `freeze_layers`, `dropout` and `precision` settings."""

import contextlib

import pytest
import torch
from transformers import AutoModel

from inferforge.errors import UserInputError
from inferforge.optimize import distill_train
from inferforge.optimize.distill import DistillConfig, distill
from tests.distill_helpers import DOCS, save_tiny_bert

CONFIG = DistillConfig(layers=(0,), steps=3, batch_size=8, max_length=24, eval_every=0, save_every=3, seed=1)
BF16_CPU = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", layers=2)


def test_frozen_embeddings_keep_the_teachers_values_while_the_layers_train(teacher_dir):
    import dataclasses

    teacher = AutoModel.from_pretrained(teacher_dir)
    frozen = distill(str(teacher_dir), None, [DOCS], dataclasses.replace(CONFIG, freeze_embeddings=True)).student
    trained = distill(str(teacher_dir), None, [DOCS], CONFIG).student
    want = teacher.get_input_embeddings().weight
    assert torch.equal(frozen.get_input_embeddings().weight, want)
    assert not torch.equal(trained.get_input_embeddings().weight, want)
    layer = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(frozen.state_dict()[layer], teacher.state_dict()[layer])


def test_frozen_layers_keep_their_initial_weights_and_the_others_train(teacher_dir):
    import dataclasses

    teacher = AutoModel.from_pretrained(teacher_dir).state_dict()
    config = dataclasses.replace(CONFIG, layers=(0, 1), freeze_embeddings=True, freeze_layers=(0,))
    student = distill(str(teacher_dir), None, [DOCS], config).student.state_dict()
    layer0 = [k for k in student if k.startswith("encoder.layer.0.")]
    layer1 = [k for k in student if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert layer0 and all(torch.equal(student[k], teacher[k]) for k in layer0)
    assert all(not torch.equal(student[k], teacher[k]) for k in layer1)


@pytest.mark.parametrize(("freeze", "match"), [((2,), "freeze_layers lists layer 2, out of range: the student has 2 layers"),
                                                ((0, 1), "freezes all 2 student layers")])
def test_bad_frozen_layers_are_refused(freeze, match):
    with pytest.raises(ValueError, match=match):     # known from the config when it lists the student's layers
        DistillConfig(layers=(0, 1), freeze_layers=freeze)
    with pytest.raises(ValueError, match=match):
        DistillConfig(num_layers=2, freeze_layers=freeze)


@pytest.mark.parametrize(("freeze", "match"), [((1,), "freeze_layers lists layer 1, out of range: the student has 1 layers"),
                                                ((0,), "freezes all 1 student layers")])
def test_frozen_layers_of_a_student_known_only_when_built_are_checked_then(teacher_dir, freeze, match):
    import dataclasses

    config = dataclasses.replace(CONFIG, layers="every-other", freeze_layers=freeze)   # 1 of the 2 teacher layers
    with pytest.raises(UserInputError, match=match):
        distill(str(teacher_dir), None, [DOCS], config)


def test_frozen_layer_and_dropout_values_are_checked():
    with pytest.raises(ValueError, match="freeze_layers must be student layer indices"):
        DistillConfig(layers=(0,), freeze_layers=(-1,))
    with pytest.raises(ValueError, match="freeze_layers lists a layer twice"):
        DistillConfig(layers=(0,), freeze_layers=(0, 0))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        DistillConfig(layers=(0,), dropout=1.0)


@pytest.mark.parametrize("dropout", [None, 0.0])
def test_dropout_zero_makes_training_passes_deterministic(teacher_dir, dropout):
    from inferforge.optimize.distill_student import build_student, load_teacher

    teacher = load_teacher(teacher_dir)
    student, _ = build_student(teacher, DistillConfig(layers=(0, 1), dropout=dropout))
    assert student.training
    ids = torch.randint(5, 90, (2, 12))
    first, second = (student(input_ids=ids).last_hidden_state for _ in range(2))
    assert torch.equal(first, second) == (dropout == 0.0)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        DistillConfig(layers=(0,), precision="fp16")


def test_cpu_bf16_puts_training_and_teacher_in_bf16_and_evaluation_in_float32():
    cpu = torch.device("cpu")
    none = (contextlib.nullcontext,) * 3
    assert distill_train._autocast(cpu, "auto") == none
    assert distill_train._autocast(cpu, "fp32") == none
    if not BF16_CPU:
        pytest.skip("this CPU has no bf16 matrix instructions (the refusal is tested below)")
    train, teacher, evaluation = distill_train._autocast(cpu, "bf16")
    with train():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()   # restored
    with teacher():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert evaluation is contextlib.nullcontext


def test_bf16_on_a_cpu_without_bf16_instructions_is_refused(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(UserInputError, match="use precision fp32"):
        distill_train._autocast(torch.device("cpu"), "bf16")


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 matrix instructions")
def test_a_bf16_run_on_the_cpu_trains_and_evaluates_in_float32(teacher_dir):
    import dataclasses

    result = distill(str(teacher_dir), None, [DOCS], dataclasses.replace(CONFIG, precision="bf16", eval_every=3))
    assert result.step == 3 and all(p.dtype == torch.float32 for p in result.student.parameters())
    assert 0 < result.metrics["mean_cosine"] <= 1


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 matrix instructions")
def test_a_bf16_run_caches_the_teacher_under_bf16_and_evaluates_it_in_float32(teacher_dir, monkeypatch):
    import dataclasses

    from inferforge.optimize import distill_eval
    from inferforge.optimize.distill_teacher_cache import TeacherCache

    seen = {}
    build, embeddings = TeacherCache.build.__func__, distill_eval.teacher_embeddings

    def spy_build(cls, teacher, token_ids, pad, device, autocast, **kwargs):
        with autocast():
            seen["cache"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        return build(cls, teacher, token_ids, pad, device, autocast, **kwargs)

    def spy_embeddings(teacher, token_ids, pad, device, autocast):
        with autocast():
            seen["evaluation"] = torch.is_autocast_enabled("cpu")
        return embeddings(teacher, token_ids, pad, device, autocast)

    monkeypatch.setattr(TeacherCache, "build", classmethod(spy_build))
    monkeypatch.setattr(distill_eval, "teacher_embeddings", spy_embeddings)
    config = dataclasses.replace(CONFIG, precision="bf16", cache_teacher=True, hidden_weight=1.0)
    result = distill(str(teacher_dir), None, [DOCS], config)
    assert seen == {"cache": torch.bfloat16, "evaluation": False}
    assert 0 < result.metrics["mean_cosine"] <= 1


def test_length_mix_adds_short_queries_and_long_passages_from_the_training_texts_only():
    from inferforge.optimize.distill_data import LONG_EVERY, SHORT_EVERY, load_distill_data, with_length_mix

    data = load_distill_data([DOCS], held_out_share=0.2, seed=3)
    validation = {data.train[0].split()[0]}                  # a later validate step's text: never trained on

    def count(text):
        return len(text.split()) + 2

    mixed = with_length_mix(data, count_tokens=count, max_tokens=64, exclude=validation)
    added = mixed.train[len(data.train):]
    short = [t for t in added if count(t) <= 5]
    long = [t for t in added if count(t) > 5]
    assert mixed.train[:len(data.train)] == data.train and mixed.held_out == data.held_out
    assert len(short) == mixed.length_mix["short_queries"] and 0 < len(short) <= len(data.train) // SHORT_EVERY
    assert len(long) == mixed.length_mix["long_passages"] and 0 < len(long) <= len(data.train) // LONG_EVERY
    assert all(count(t) >= 0.75 * 64 for t in long)
    assert not (set(added) & (set(data.held_out) | validation | set(data.train)))
    assert mixed.record()["length_mix"]["long_passages"] == len(long)


def test_length_mix_never_adds_a_held_out_text_or_repeats_a_training_text():
    from inferforge.optimize.distill_data import DistillData, with_length_mix

    long_text = " ".join(f"w{i}" for i in range(70))          # already past 75% of 64 tokens on its own
    train = (long_text, *[f"Alpha beta gamma {i} delta" for i in range(40)], *[f"Omega {i} psi chi" for i in range(40)])
    data = DistillData(files=(), train=train, held_out=("Alpha", "Omega 2"), excluded=0)
    mixed = with_length_mix(data, count_tokens=lambda t: len(t.split()) + 2, max_tokens=64)
    added = mixed.train[len(train):]
    assert {"Alpha beta", "Alpha beta gamma", "Omega", "Omega 0 psi"} <= set(added)   # 1-3-word queries are made
    assert "Alpha" not in added and "Omega 2" not in added    # but not the held-out texts
    assert long_text not in added and len(added) == len(set(added))
    assert mixed.length_mix["long_passages"] == sum(len(t.split()) > 5 for t in added) > 0


def test_a_length_mix_run_trains_on_the_added_texts_but_never_an_excluded_one(teacher_dir):
    import dataclasses

    from inferforge.optimize.distill_data import load_distill_data

    first_word = load_distill_data([DOCS], held_out_share=CONFIG.held_out_share, seed=CONFIG.seed).train[0].split()[0]
    config = dataclasses.replace(CONFIG, length_mix=True, max_length=48)
    mixed = distill(str(teacher_dir), None, [DOCS], config).data
    assert mixed.length_mix["short_queries"] > 0 and mixed.length_mix["long_passages"] > 0
    assert first_word in mixed.train                          # a short query of the first training text
    excluded = distill(str(teacher_dir), None, [DOCS], config, exclude=[first_word]).data
    assert first_word not in excluded.train and excluded.length_mix["short_queries"] > 0


def test_new_settings_at_their_defaults_leave_the_resume_fingerprint_as_before():
    """A checkpoint written before freeze_layers, dropout and length_mix existed still resumes."""
    settings = DistillConfig(layers=(0, 1)).run_settings("encoder")
    assert not {"freeze_layers", "dropout", "length_mix"} & set(settings)
    changed = DistillConfig(layers=(0, 1, 2), freeze_layers=[1, 0], dropout=0.0, length_mix=True).run_settings("encoder")
    assert changed["freeze_layers"] == [0, 1] and changed["dropout"] == 0.0 and changed["length_mix"] is True


def test_the_optimizer_is_fused_adamw_with_no_decay_on_biases_and_norms():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer, _ = distill_train._optimizer(module, DistillConfig(layers=(0,), weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    decay, no_decay = optimizer.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 matrix instructions")
def test_a_bf16_run_without_the_cache_runs_the_teachers_pass_in_each_step_under_bf16(teacher_dir, monkeypatch):
    import dataclasses

    seen, sample_losses = [], distill_train.sample_losses

    def spy(module, teacher, *args, **kwargs):
        hook = teacher.register_forward_hook(
            lambda *_: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        try:
            return sample_losses(module, teacher, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(distill_train, "sample_losses", spy)
    distill(str(teacher_dir), None, [DOCS], dataclasses.replace(CONFIG, precision="bf16", cache_teacher=False, steps=1))
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


def test_resuming_a_checkpoint_of_the_unfused_optimizer_keeps_the_fused_update(tmp_path):
    from inferforge.optimize import distill_checkpoint as ckpt

    def fresh(fused):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=fused)
        return module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    module, optimizer, scheduler = fresh(None)          # how checkpoints were written before fused AdamW
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    path = ckpt.save_checkpoint(tmp_path, step=1, module=module, optimizer=optimizer, scheduler=scheduler,
                                rng_states=[ckpt.rng_state()], state={})
    module, optimizer, scheduler = fresh(True)
    ckpt.load_checkpoint(path, module=module, optimizer=optimizer, scheduler=scheduler)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert all(state["step"].dtype == torch.float32 and float(state["step"]) == 1.0 for state in optimizer.state.values())
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()                                      # the fused kernel takes the loaded state
    assert all(float(state["step"]) == 2.0 for state in optimizer.state.values())


def test_cpu_bf16_keeps_a_decoder_teachers_logits_in_float32():
    if not BF16_CPU:
        pytest.skip("this CPU has no bf16 matrix instructions")
    _, teacher, evaluation = distill_train._autocast(torch.device("cpu"), "bf16", "decoder")
    assert teacher is contextlib.nullcontext and evaluation is contextlib.nullcontext

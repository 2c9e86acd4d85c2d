"""The teacher and the student: loading the teacher, building the student from it.

Two families: BERT-style encoders (a `*Model` whose layers are `encoder.layer`) and Llama-family
decoders (a `*ForCausalLM` whose layers are `model.layers`). The student has the teacher's class and
configuration except the depth (and, when asked, the width). `layer_map[i]` is the teacher layer
whose output student layer `i` learns to reproduce; teacher weights are copied wherever the student
has a parameter of the same name (layer `i` taking teacher layer `layer_map[i]`) and shape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inferforge.errors import UserInputError

# The config keys of dropout probabilities that `dropout` overrides in the student (BERT, Llama families).
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")
# model_type -> (kind, prefix of the per-layer parameter names)
FAMILIES = {
    "bert": ("encoder", "encoder.layer."), "roberta": ("encoder", "encoder.layer."),
    "xlm-roberta": ("encoder", "encoder.layer."), "electra": ("encoder", "encoder.layer."),
    "llama": ("decoder", "model.layers."), "mistral": ("decoder", "model.layers."), "qwen2": ("decoder", "model.layers."),
}


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    kind: str            # "encoder" or "decoder"
    layer_prefix: str
    config: object       # the transformers config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def load_teacher(path: str | Path) -> Teacher:
    """The teacher in float32, eval mode, gradients off, with its tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserInputError(f"teacher {path}: model type {config.model_type!r} is not supported for distillation; "
                             f"supported: {', '.join(sorted(FAMILIES))}")
    kind, prefix = family
    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    model = cls.from_pretrained(path).float().eval()
    model.requires_grad_(False)
    return Teacher(model, AutoTokenizer.from_pretrained(path), kind, prefix, model.config)


def parse_layers(text: str) -> tuple[int, ...] | str:
    """`--layers 0,3,5` -> (0, 3, 5); `every-other` stays a name."""
    text = text.strip()
    if text == "every-other":
        return text
    try:
        layers = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise UserInputError(f"--layers {text!r}: give comma-separated teacher layer indices such as 0,3,5, "
                             "or use --every-other") from None
    negative = [i for i in layers if i < 0]
    if negative:
        raise UserInputError(f"--layers {text}: layer {negative[0]} is out of range: teacher layers are counted from "
                             "0 (the first is 0); fix --layers")
    return layers


def resolve_layers(layers, num_teacher_layers: int) -> tuple[int, ...]:
    """Layer indices to keep, checked against the teacher's depth."""
    if layers == "every-other":
        return tuple(range(0, num_teacher_layers, 2))
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad:
        raise UserInputError(f"layer {bad[0]} is out of range: the teacher has {num_teacher_layers} layers "
                             f"(0-{num_teacher_layers - 1}); fix --layers")
    return tuple(layers)


def evenly_spaced(num_teacher_layers: int, num_student_layers: int) -> tuple[int, ...]:
    """The teacher layers a shallower student maps onto: student layer i learns teacher layer
    round((i + 1) * T / S) - 1, so the last student layer learns the teacher's last layer."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise UserInputError(f"--num-layers {num_student_layers}: the teacher has {num_teacher_layers} layers; "
                             f"choose 1-{num_teacher_layers}")
    return tuple(round((i + 1) * num_teacher_layers / num_student_layers) - 1 for i in range(num_student_layers))


def _narrower(config_dict: dict, hidden_size: int) -> dict:
    """The teacher's configuration at `hidden_size`, keeping its head size and MLP ratio."""
    hidden, heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
    head_dim = config_dict.get("head_dim") or hidden // heads
    if hidden_size % head_dim:
        raise UserInputError(f"--hidden-size {hidden_size} must be a multiple of the teacher's head size {head_dim}")
    new_heads = hidden_size // head_dim
    out = dict(config_dict, hidden_size=hidden_size, num_attention_heads=new_heads,
               intermediate_size=max(1, config_dict["intermediate_size"] * hidden_size // hidden))
    if "head_dim" in config_dict:
        out["head_dim"] = head_dim
    if config_dict.get("num_key_value_heads"):
        group = max(1, heads // config_dict["num_key_value_heads"])
        out["num_key_value_heads"] = max(1, new_heads // group) if new_heads % group == 0 else new_heads
    return out


def build_student(teacher: Teacher, config, student_dir: str | Path | None = None, *, seed: int = 0):
    """The student model (float32, train mode) and its plan: {"layer_map", "num_layers", "hidden_size",
    "teacher_hidden_size", "copied", "initialised"}. `config` is a DistillConfig."""
    torch.manual_seed(seed)
    base = teacher.config.to_dict()
    if student_dir is not None:
        student_config = _read_student_config(student_dir, base)
    elif config.layers is not None:
        layer_map = resolve_layers(config.layers, teacher.num_layers)
        student_config = dict(base, num_hidden_layers=len(layer_map))
    elif config.num_layers is not None:
        student_config = dict(base, num_hidden_layers=config.num_layers)
        if config.hidden_size is not None and config.hidden_size != base["hidden_size"]:
            student_config = _narrower(student_config, config.hidden_size)
    else:
        raise UserInputError("no student: give --layers, --every-other, --num-layers or --student-config")
    n = student_config["num_hidden_layers"]
    if student_dir is not None and not 1 <= n <= teacher.num_layers:
        raise UserInputError(f"--student-config {student_dir}: num_hidden_layers {n}, but the teacher has "
                             f"{teacher.num_layers} layers; a student has 1-{teacher.num_layers}")
    if config.layers is None or student_dir is not None:
        layer_map = evenly_spaced(teacher.num_layers, n)
    # A student that underfits its teacher learns faster without dropout; the value stays in the student's
    # saved config.json, where inference ignores it.
    if config.dropout is not None:
        for key in DROPOUT_KEYS:
            if key in student_config:
                student_config[key] = config.dropout
    if student_config.get("layer_types"):   # transformers' per-layer attention kinds follow the kept layers
        student_config["layer_types"] = [base["layer_types"][i] for i in layer_map]
    config_obj = type(teacher.config).from_dict(student_config)
    student = type(teacher.model)(config_obj)
    copied = copy_teacher_weights(teacher, student, layer_map)
    if student_dir is not None and any(Path(student_dir).glob("*.safetensors")):
        _load_student_weights(student, student_dir)
        copied = []   # the student directory's own weights
    total = len(student.state_dict())
    plan = {"layer_map": list(layer_map), "num_layers": n, "hidden_size": student_config["hidden_size"],
            "teacher_num_layers": teacher.num_layers, "teacher_hidden_size": base["hidden_size"],
            "copied_tensors": len(copied), "total_tensors": total,
            "init": ("student directory weights" if student_dir is not None and not copied and
                     any(Path(student_dir).glob("*.safetensors"))
                     else "teacher layers copied" if len(copied) == total else
                     "partly copied from the teacher, the rest initialised randomly" if copied else "random")}
    return student.float().train(), plan


def freeze_student_layers(student: torch.nn.Module, layer_prefix: str, indices) -> None:
    """Stop training student layers `indices` (counted from 0): their parameters keep their values."""
    layers = student.get_submodule(layer_prefix.rstrip("."))
    n = len(layers)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserInputError(f"freeze_layers lists layer {bad[0]}, out of range: the student has {n} layers "
                             f"(0-{n - 1})")
    if len(set(indices)) == n:
        raise UserInputError(f"freeze_layers freezes all {n} student layers: leave at least one out to train")
    for i in indices:
        layers[i].requires_grad_(False)


def _read_student_config(student_dir, base: dict) -> dict:
    path = Path(student_dir) / "config.json"
    if not path.is_file():
        raise UserInputError(f"--student-config {student_dir}: no config.json; give a directory with the student's "
                             "Hugging Face config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"--student-config {path}: not valid JSON ({e})") from None
    if data.get("model_type") != base["model_type"]:
        raise UserInputError(f"--student-config {path}: model_type {data.get('model_type')!r} differs from the "
                             f"teacher's {base['model_type']!r}; the student must be the teacher's architecture")
    if data.get("vocab_size") != base["vocab_size"]:
        raise UserInputError(f"--student-config {path}: vocab_size {data.get('vocab_size')} differs from the "
                             f"teacher's {base['vocab_size']}; teacher and student must share the tokenizer's "
                             "vocabulary (set vocab_size to the teacher's)")
    return dict(base, **{k: v for k, v in data.items() if k not in ("architectures", "_name_or_path")})


def _load_student_weights(student: torch.nn.Module, student_dir) -> None:
    """The student directory's safetensors weights into `student` (built from its config.json); a
    tensor whose shape the config does not give is refused naming the file and the tensor."""
    from safetensors import safe_open

    expected = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    for path in sorted(Path(student_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    raise UserInputError(f"--student-config {student_dir}: {path.name} does not match its config.json: "
                                         f"{key} has shape {list(shape)}, the config gives {list(expected[key])}; "
                                         "save the weights and config.json together (save_pretrained)")
    try:
        loaded = type(student).from_pretrained(student_dir).float()
        student.load_state_dict(loaded.state_dict())
    except (RuntimeError, ValueError, OSError) as e:
        first = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e).splitlines()[0])
        raise UserInputError(f"--student-config {student_dir}: its weights do not match its config.json ({first}); "
                             "save the weights and config.json together (save_pretrained)") from None


def copy_teacher_weights(teacher: Teacher, student: torch.nn.Module, layer_map) -> list[str]:
    """Copy every teacher tensor whose (layer-mapped) name and shape the student has; returns the
    student names copied."""
    layer_key = re.compile(rf"^{re.escape(teacher.layer_prefix)}(\d+)\.(.*)$")
    source = teacher.model.state_dict()
    target = student.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in target.items():
            m = layer_key.match(name)
            origin = f"{teacher.layer_prefix}{layer_map[int(m.group(1))]}.{m.group(2)}" if m else name
            if origin in source and source[origin].shape == tensor.shape:
                tensor.copy_(source[origin])
                copied.append(name)
    return copied


class StudentWithHeads(torch.nn.Module):
    """The student plus what training compares: the pooled embedding (encoders) or the logits
    (decoders), and the hidden states after each layer, projected to the teacher's width by a learned
    linear map when the widths differ. One module, so DistributedDataParallel sees every parameter."""

    def __init__(self, student: torch.nn.Module, kind: str, teacher_hidden: int, *, want_hidden: bool):
        super().__init__()
        self.student, self.kind, self.want_hidden = student, kind, want_hidden
        width = student.config.hidden_size
        self.projection = None if width == teacher_hidden else torch.nn.Linear(width, teacher_hidden, bias=False)

    def _project(self, x):
        return x if self.projection is None else self.projection(x)

    def forward(self, input_ids, attention_mask):
        from inferforge.optimize.distill_losses import masked_mean_pool

        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.want_hidden)
        result = {}
        if self.kind == "encoder":
            result["pooled"] = self._project(masked_mean_pool(out.last_hidden_state, attention_mask))
        else:
            result["logits"] = out.logits
        if self.want_hidden:
            result["hidden"] = [self._project(h) for h in out.hidden_states[1:]]
        return result

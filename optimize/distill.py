"""Knowledge distillation: train a smaller student to reproduce a teacher.

    from inferforge.optimize.distill import DistillConfig, distill
    result = distill("all-MiniLM-L6-v2", None, ["fortunes.txt"], DistillConfig(layers=(0, 3, 5), steps=200))
    result.metrics        # held-out: mean/min cosine to the teacher (encoders), top-1 agreement + KL (decoders)

The student is the teacher's own architecture with fewer layers: chosen teacher layers copied
(`layers=(0, 3, 5)` or `layers="every-other"`, as DistilBERT did), `num_layers=N` (evenly spaced
teacher layers; with `hidden_size=H` a narrower, freshly initialised model whose hidden states are
compared through a learned projection), or a directory with a config.json (and optionally weights).
Training (AdamW, warm-up + cosine schedule, accumulation, clipping, checkpoints that resume to
identical weights, DistributedDataParallel under torchrun) is in `distill_train`; the student
artifact (a Hugging Face directory with a manifest) is written by `distill_artifact`.

The modules: `distill_losses` (losses), `distill_student` (teacher loading, student construction),
`distill_data` (texts, held-out split, batch order), `distill_eval` (held-out metrics),
`distill_checkpoint` (checkpoints, signal handling), `distill_train` (the loop), `distill_artifact`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EVERY_OTHER = "every-other"
EMBEDDING_LOSSES = ("cosine", "mse")
HIDDEN_LOSSES = ("mse", "cosine")
HIDDEN_LAYERS = ("all", "last")
LR_SCHEDULES = ("steps", "time")
# Settings a resumed run may change (see DistillConfig.run_settings).
PRECISIONS = ("auto", "fp32", "bf16")
RESUME_FREE = frozenset({"steps", "max_minutes", "eval_every", "save_every", "target_mean_cosine",
                         "target_top1_agreement", "min_mean_cosine", "min_cosine", "min_top1_agreement", "max_kl"})
# Settings added after checkpoints were first written, left out of `run_settings` while at these
# defaults, so a checkpoint written before they existed still resumes.
LATER_DEFAULTS = {"freeze_layers": [], "dropout": None, "length_mix": False, "hidden_loss": "mse",
                  "hidden_layers": "all"}
# Loss settings only one model family uses.
LOSS_SETTINGS = {"encoder": ("embedding_loss", "embedding_weight"), "decoder": ("kl_weight", "task_weight", "temperature")}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _share_ok(value) -> bool:
    return value is None or 0 <= value <= 1


@dataclass(frozen=True)
class DistillConfig:
    """How to build and train the student, and what held-out quality it must reach.

    Student (one of): `layers` (teacher layer indices to keep, or "every-other"), `num_layers`
    (evenly spaced teacher layers, or a new model of that depth when `hidden_size` differs), or a
    student directory passed to `distill` (then neither is needed).
    Losses (weights of a per-sample sum): encoders `embedding_weight` x `embedding_loss` (cosine or
    mse) on the attention-masked mean-pooled embedding, `hidden_weight` x `hidden_loss` on the hidden
    states of each student layer against its teacher layer; decoders `kl_weight` x T^2 KL on logits
    softened by `temperature`, `hidden_weight` x `hidden_loss`, `task_weight` x next-token cross-
    entropy. `hidden_weight` None: 0 for encoders, 1 for decoders. `hidden_loss`: "mse" (per-token
    squared error) or "cosine" (per-token 1 - cos, blind to the states' scale); `hidden_layers`:
    "all" (every student layer against its teacher layer) or "last" (only the last, whose states the
    pooled embedding averages: the earlier layers are free to split the teacher's work differently).
    Training: `steps` optimizer steps of `batch_size` texts (all ranks together), each in
    `grad_accum` micro-batches; AdamW at `lr` with `warmup_share` of the steps of linear warm-up, then
    a cosine decay to 0; gradients clipped to `max_grad_norm`. `group_by_length`: each batch holds
    texts of similar length (random batches, shuffled; see `distill_data.epoch_order`), so batches
    pad to fewer tokens. `cache_teacher` (encoders): run the teacher once over the training texts
    before training and keep its outputs, instead of once per step (see `distill_teacher_cache`; the
    time counts in `max_minutes`). `freeze_embeddings`: the student's input token embeddings keep the
    teacher's values (not trained: fewer parameters for AdamW to update each step; a decoder with tied
    embeddings keeps its LM head too). `freeze_layers`: student layer indices (from 0) whose weights keep
    their initial values, e.g. [0] when student layer 0 is the teacher's layer 0 (no gradient flows
    through it when the embeddings are frozen too, so each step is cheaper). `dropout`: the student's
    dropout probability while training (hidden and attention; None keeps the teacher config's; 0 turns
    it off, which suits a student that underfits its teacher); it is also what the student's saved
    config.json says, which inference ignores. `length_mix`: add short queries and long
    passages made from the training texts to them (`distill_data.with_length_mix`), so a student that
    will be validated on 3-word queries and near-`max_length` passages has trained on such inputs.
    `precision`: "auto" (bf16 autocast on a GPU, float32 on a CPU),
    "fp32", or "bf16" (bf16 autocast for the student's training passes on a CPU too, which pays on CPUs
    with AMX or AVX-512 BF16; an encoder teacher's targets, cached or not, are computed under bf16
    autocast there too; a decoder teacher and every evaluation stay float32). Evaluation every `eval_every` steps
    (0: only at the end), a checkpoint every `save_every` steps, a stop after `max_minutes`.
    `lr_schedule="time"` (with `max_minutes`): warm-up and decay advance with the elapsed share of the
    time budget whenever that is further along than the share of `steps` done, so a run that the
    budget cuts short still ends with the learning rate decayed to ~0 (set `steps` to what a quiet
    machine would reach; the weights then depend on the machine's speed, so a resumed run is not
    bit-identical to an uninterrupted one).
    Early stop: `target_mean_cosine` / `target_top1_agreement`. Gate (the artifact is written only
    if it holds): `min_mean_cosine`, `min_cosine` (encoders), `min_top1_agreement`, `max_kl` (decoders).
    """

    layers: tuple[int, ...] | str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    max_grad_norm: float = 1.0
    max_minutes: float | None = None
    lr_schedule: str = "steps"
    eval_every: int = 50
    save_every: int = 50
    held_out_share: float = 0.1
    max_length: int | None = None
    group_by_length: bool = True
    cache_teacher: bool = False
    freeze_embeddings: bool = False
    freeze_layers: tuple[int, ...] = ()
    dropout: float | None = None
    length_mix: bool = False
    precision: str = "auto"
    seed: int = 0
    embedding_loss: str = "cosine"
    embedding_weight: float = 1.0
    hidden_weight: float | None = None
    hidden_loss: str = "mse"
    hidden_layers: str = "all"
    kl_weight: float = 1.0
    task_weight: float = 0.0
    temperature: float = 2.0
    target_mean_cosine: float | None = None
    target_top1_agreement: float | None = None
    min_mean_cosine: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    max_kl: float | None = None

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.freeze_layers, list):
            object.__setattr__(self, "freeze_layers", tuple(self.freeze_layers))
        if isinstance(self.layers, str):
            _require(self.layers == EVERY_OTHER, f"layers must be a list of layer indices or '{EVERY_OTHER}', "
                                                 f"got {self.layers!r}")
        elif self.layers is not None:
            _require(len(self.layers) > 0, "layers must name at least one teacher layer")
            _require(all(isinstance(i, int) and i >= 0 for i in self.layers),
                     "layers must be teacher layer indices >= 0 (counted from 0)")
            _require(len(set(self.layers)) == len(self.layers), "layers lists a teacher layer twice")
            _require(list(self.layers) == sorted(self.layers), "layers must be in increasing order")
        _require(self.layers is None or self.num_layers is None,
                 "give layers (which teacher layers to keep) or num_layers (how many), not both")
        _require(self.num_layers is None or self.num_layers >= 1, "num_layers must be >= 1")
        _require(self.hidden_size is None or self.num_layers is not None,
                 "hidden_size needs num_layers (a new, narrower student); layers keeps the teacher's width")
        _require(self.hidden_size is None or self.hidden_size >= 1, "hidden_size must be >= 1")
        _require(self.steps >= 1, "steps must be >= 1")
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum must be >= 1")
        _require(self.batch_size % self.grad_accum == 0,
                 f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        _require(self.lr > 0, "lr must be > 0")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(0 <= self.warmup_share < 1, "warmup_share must be in [0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _require(self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0")
        _require(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        _require(self.lr_schedule != "time" or self.max_minutes is not None,
                 "lr_schedule 'time' follows the time budget: set max_minutes too")
        _require(self.eval_every >= 0, "eval_every must be >= 0 (0: evaluate only at the end)")
        _require(self.save_every >= 1, "save_every must be >= 1")
        _require(0 < self.held_out_share < 1, "held_out_share must be between 0 and 1 (0.1 or 10%)")
        _require(self.max_length is None or 2 <= self.max_length <= 8192, "max_length must be between 2 and 8192")
        _require(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.freeze_layers),
                 "freeze_layers must be student layer indices >= 0 (counted from 0)")
        _require(len(set(self.freeze_layers)) == len(self.freeze_layers), "freeze_layers lists a layer twice")
        object.__setattr__(self, "freeze_layers", tuple(sorted(self.freeze_layers)))   # ints, checked above
        depth = len(self.layers) if isinstance(self.layers, tuple) else self.num_layers
        if depth is not None and self.freeze_layers:   # else checked once the student is built
            _require(max(self.freeze_layers) < depth, f"freeze_layers lists layer {max(self.freeze_layers)}, out of range: "
                                                      f"the student has {depth} layers (0-{depth - 1})")
            _require(len(self.freeze_layers) < depth, f"freeze_layers freezes all {depth} student layers: leave at "
                                                      "least one out to train")
        _require(self.dropout is None or 0 <= self.dropout < 1,
                 "dropout must be in [0, 1) (0: no dropout while training the student), or unset for the teacher's")
        _require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.embedding_loss in EMBEDDING_LOSSES, f"embedding_loss must be one of {', '.join(EMBEDDING_LOSSES)}")
        for name in ("embedding_weight", "kl_weight", "task_weight"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        _require(self.hidden_weight is None or self.hidden_weight >= 0, "hidden_weight must be >= 0")
        _require(self.hidden_loss in HIDDEN_LOSSES, f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, "
                                                    f"got {self.hidden_loss!r}")
        _require(self.hidden_layers in HIDDEN_LAYERS, f"hidden_layers must be one of {', '.join(HIDDEN_LAYERS)}, "
                                                      f"got {self.hidden_layers!r}")
        _require(self.temperature > 0, "temperature must be > 0")
        for name in ("target_top1_agreement", "min_top1_agreement"):
            _require(_share_ok(getattr(self, name)), f"{name} must be between 0 and 1")
        for name in ("target_mean_cosine", "min_mean_cosine", "min_cosine"):
            value = getattr(self, name)
            _require(value is None or -1 <= value <= 1, f"{name} must be between -1 and 1")
        _require(self.max_kl is None or self.max_kl >= 0, "max_kl must be >= 0")

    def resolved_hidden_weight(self, kind: str) -> float:
        if self.hidden_weight is not None:
            return self.hidden_weight
        return 1.0 if kind == "decoder" else 0.0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def run_settings(self, kind: str) -> dict:
        """What a resumed run must share with the run it continues: every setting that changes the
        weights step by step for a teacher of `kind` ("encoder" or "decoder"). `steps` (a longer run
        extends it; the schedule follows the new total), the time budget, evaluation, checkpoint
        interval, targets and gates may change, and so may the other model family's loss settings."""
        other = LOSS_SETTINGS["decoder" if kind == "encoder" else "encoder"]
        kept = {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE and k not in other}
        kept["hidden_weight"] = self.resolved_hidden_weight(kind)
        return {k: v for k, v in kept.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}

    def fingerprint(self, kind: str) -> str:
        return hashlib.sha256(json.dumps(self.run_settings(kind), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DistillResult:
    """What `distill` returns. `student` is the trained Hugging Face model (unwrapped, on the CPU in
    float32), `metrics` the final held-out metrics, `history` the logged rows (one per eval and per
    logged step), `stopped` why training ended: "steps", "target", "time", or "interrupted"."""

    kind: str                    # "encoder" or "decoder"
    student: object
    tokenizer: object
    teacher: object              # a ModelSource: spec, local path, weights_sha256
    data: object                 # a DistillData
    config: DistillConfig
    plan: dict                   # the student's layers, width, copied weights
    metrics: dict
    history: list = field(default_factory=list)
    stopped: str = "steps"
    step: int = 0
    train_seconds: float = 0.0
    checkpoint_dir: Path | None = None
    rank: int = 0                # 0 on the single process and on torchrun's rank 0: the one that writes


def distill(teacher, student, data: Sequence[str | Path], config: DistillConfig, *,
            checkpoint_dir: str | Path | None = None, resume: bool = False, exclude: Sequence[str] = (),
            progress=None, workdir: str | Path | None = None) -> DistillResult:
    """Train a student of `teacher` on the texts of `data` and return it with its held-out metrics.

    `teacher`: a model spec as recipes take it (a Hugging Face directory, `all-MiniLM-L6-v2`, or a
    `module:function` factory) or a `ModelSource`. `student`: None (built from `config`'s `layers`
    or `num_layers`) or a directory holding the student's config.json (weights optional; its
    vocabulary must be the teacher's). `data`: .txt (one passage per line) or .jsonl ("text") files;
    `config.held_out_share` of the distinct texts, chosen with `config.seed`, are held out and never
    trained on, nor are the texts in `exclude` (e.g. a later validation step's held-out set).
    `workdir`: where a `module:function` teacher is saved (None: a temporary directory, removed with
    the returned result). `checkpoint_dir`: where checkpoints go (None: none are written);
    `resume=True` continues the latest checkpoint there. Under torchrun the same call trains with DistributedDataParallel.
    Raises `UserInputError` for bad inputs and `DistillInterrupted` after saving a checkpoint on
    SIGINT/SIGTERM.
    """
    import shutil
    import tempfile
    import weakref

    from inferforge.models import ModelSource, materialize
    from inferforge.optimize.distill_train import run_training

    if isinstance(teacher, ModelSource):
        source = teacher
    else:
        scratch = None if workdir else Path(tempfile.mkdtemp(prefix="inferforge-distill-"))
        kept = False
        try:
            source = materialize(str(teacher), Path(workdir) if workdir else scratch)
            result = run_training(source, student, [Path(p) for p in data], config, checkpoint_dir=checkpoint_dir,
                                  resume=resume, exclude=exclude, progress=progress)
            # A factory's teacher was saved in the scratch directory, which result.teacher.path names (the
            # artifact copies its tokenizer from there): it goes when the result does.
            if scratch is not None and scratch in Path(source.path).parents:
                weakref.finalize(result, shutil.rmtree, scratch, True)
                kept = True
            return result
        finally:
            if scratch is not None and not kept:
                shutil.rmtree(scratch, ignore_errors=True)
    return run_training(source, student, [Path(p) for p in data], config, checkpoint_dir=checkpoint_dir,
                        resume=resume, exclude=exclude, progress=progress)

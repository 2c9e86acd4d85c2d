"""The distillation training loop, on one process or under torchrun with DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 the
process group starts from them (NCCL on GPUs, gloo on CPUs), so single- and multi-node torchrun
arguments work alike. Every rank reads its share of each batch (`distill_data.rank_share`); only
rank 0 evaluates, logs and writes checkpoints. Each step all ranks agree (one all-reduce) on the
loss and on whether to stop: a signal, the time budget, or the early-stop target.

Bit-identical resume: the batch order is a function of (seed, epoch, step), the checkpoint holds
the weights, optimizer, scheduler and every rank's RNG states, and evaluation uses no randomness.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inferforge.errors import UserInputError
from inferforge.optimize import distill_checkpoint as ckpt
from inferforge.optimize.distill_data import (
    collate,
    load_distill_data,
    pad_id,
    rank_share,
    resolve_max_length,
    step_indices,
    tokenize_all,
    with_length_mix,
)
from inferforge.optimize.distill_losses import (
    HIDDEN_LOSS_FUNCTIONS,
    embedding_loss,
    hidden_pairs,
    kl_divergence,
    masked_mean_pool,
    next_token_cross_entropy,
)


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> DistEnv:
    """The process group from torchrun's environment variables, or a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return DistEnv(device=device)


def _autocast(device: torch.device, precision: str = "auto", kind: str = "encoder"):
    """(training, teacher, evaluation) autocast contexts for `DistillConfig.precision` and the teacher's
    `kind`. With bf16 on a CPU an encoder teacher's targets (its cache, or its pass in each step) are
    computed under bf16 autocast too, about 2.4x faster than in float32 for MiniLM on a 2-core CPU with
    AVX-512 BF16; against the float32 teacher its pooled embeddings kept a cosine of 0.99997 or more
    and its hidden states a relative error under 0.7%, far below what the student misses by. A decoder
    teacher's logits stay float32 there (measured for encoders only). Evaluation stays float32."""
    if precision == "fp32":
        return contextlib.nullcontext, contextlib.nullcontext, contextlib.nullcontext
    if device.type == "cuda":
        bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)   # noqa: E731
        return bf16, bf16, bf16
    if precision == "bf16":
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise UserInputError("precision bf16 on this CPU: it has no bf16 matrix instructions (AVX-512 BF16 or "
                                 "AMX), where bf16 is slower than float32; use precision fp32 (or auto)")
        teacher = _cpu_bf16_teacher if kind == "encoder" else contextlib.nullcontext
        return _cpu_bf16_training, teacher, contextlib.nullcontext
    return contextlib.nullcontext, contextlib.nullcontext, contextlib.nullcontext


def _cpu_bf16_teacher():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def _cpu_bf16_training():
    """bf16 autocast with attention through SDPA's math kernel. Measured on a 2-core AMX CPU, a training
    step of the 3-layer MiniLM student (batch 32, no dropout) took about 1.5x longer with the CPU
    flash-attention kernel's bf16 backward; with dropout the two were level. float32 steps were as
    fast either way, so float32 keeps the default choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


def lr_factor(step: int, total: int, warmup_share: float) -> float:
    """Linear warm-up over the first `warmup_share` of the steps, then cosine decay to 0."""
    warmup = int(total * warmup_share)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def schedule_step(step: int, total: int, time_share: float | None) -> int:
    """The step the learning-rate schedule is at: `step`, or with a time-driven schedule the step as far
    through `total` as `time_share` (the elapsed share of the time budget) is, when that is further."""
    if time_share is None:
        return step
    return min(max(step, int(time_share * total)), total - 1)


def _optimizer(module, config, time_share=None):
    """AdamW and the warm-up + cosine schedule; `time_share`: a callable giving the elapsed share of the
    time budget, for `lr_schedule="time"`."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]   # biases, norms
    # The fused kernel updates every parameter in one pass: on a 2-core CPU, 3 ms a step for the 3-layer
    # MiniLM student against 13 ms for the per-parameter loop (7% of a step).
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(schedule_step(s, config.steps, time_share() if time_share else None),
                                       config.steps, config.warmup_share))
    return optimizer, scheduler


def sample_losses(module, teacher, kind: str, ids, mask, config, hidden_weight: float, layer_map, autocast,
                  targets: dict | None = None, teacher_autocast=None) -> dict:
    """The weighted loss terms of one micro-batch, each `[batch]` (see `distill_losses`). `targets`: the
    teacher's outputs for this batch from a `TeacherCache` (encoders) instead of running the teacher,
    which runs under `teacher_autocast` (default: the student's `autocast`)."""
    with autocast():
        out = module(ids, mask)
    if targets is None:
        with torch.no_grad(), (teacher_autocast or autocast)():
            t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_weight > 0)
    pairs = hidden_pairs(layer_map, config.hidden_layers)
    if targets is None and kind == "encoder":
        targets = {"pooled": masked_mean_pool(t.last_hidden_state.float(), mask)}
        if hidden_weight:
            targets["hidden"] = [t.hidden_states[j + 1] for _, j in pairs]
    parts = {}
    if kind == "encoder":
        if config.embedding_weight:
            parts["embedding"] = config.embedding_weight * embedding_loss(out["pooled"], targets["pooled"].to(ids.device),
                                                                          config.embedding_loss)
    else:
        if config.kl_weight:
            parts["kl"] = config.kl_weight * kl_divergence(out["logits"], t.logits, mask, temperature=config.temperature)
        if config.task_weight:
            parts["task"] = config.task_weight * next_token_cross_entropy(out["logits"], ids, mask)
    if hidden_weight:
        # targets["hidden"][k] (cached or just computed) is the teacher layer of pairs[k]
        wanted = (targets["hidden"] if kind == "encoder" else [t.hidden_states[j + 1] for _, j in pairs])
        loss_fn = HIDDEN_LOSS_FUNCTIONS[config.hidden_loss]
        per_layer = [loss_fn(out["hidden"][i], wanted[k].to(ids.device), mask) for k, (i, _) in enumerate(pairs)]
        parts["hidden"] = hidden_weight * torch.stack(per_layer).mean(dim=0)
    return parts


def _teacher_cache(teacher, train_ids, pad: int, device, autocast, progress, *, layers):
    from inferforge.optimize.distill_teacher_cache import TeacherCache

    task = progress.task("running the teacher once over the training texts", total=len(train_ids)) if progress else None
    try:
        return TeacherCache.build(teacher, train_ids, pad, device, autocast, layers=layers,
                                  on_batch=task.advance if task else None)
    finally:
        if task:
            task.close()


def accumulate_gradients(train_module, teacher_model, kind: str, micro_batches, pad: int, config,
                         hidden_weight: float, layer_map, *, world: int = 1, device: str | torch.device = "cpu",
                         autocast=contextlib.nullcontext, targets_for=None, teacher_autocast=None) -> dict:
    """Forward and backward over this rank's micro-batches of one step (each a list of token id
    lists), adding to the gradients (`targets_for(j, ids)`: the cached teacher outputs of
    micro-batch j, or None to run the teacher): after it (and DDP's average over `world` ranks) they are those of
    the mean loss over the step's `config.batch_size` texts. Returns each loss term's sum over them."""
    totals = {}
    for j, micro in enumerate(micro_batches):
        ids, mask = collate(micro, pad)
        ids, mask = ids.to(device), mask.to(device)
        sync = j == len(micro_batches) - 1 or world == 1
        with contextlib.nullcontext() if sync else train_module.no_sync():
            targets = targets_for(j, ids) if targets_for is not None else None
            parts = sample_losses(train_module, teacher_model, kind, ids, mask, config, hidden_weight, layer_map,
                                  autocast, targets, teacher_autocast)
            # DDP averages gradients over ranks: scale the rank's sum so the result is the batch mean.
            loss = sum(parts.values()).sum() * world / config.batch_size
            loss.backward()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach().sum())
    return totals


class _Display:
    """A progress bar with loss and samples/s on the console (rank 0, not quiet), lines for evaluations
    and checkpoints."""

    def __init__(self, progress, total: int, start: int):
        self.progress, self.bar = progress, None
        if progress is not None and not progress.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                    console=progress.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("distilling", total=total, completed=start, info="")

    def step(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _target_reached(kind: str, metrics: dict, config) -> bool:
    if kind == "encoder":
        return config.target_mean_cosine is not None and metrics["mean_cosine"] >= config.target_mean_cosine
    return config.target_top1_agreement is not None and metrics["top1_agreement"] >= config.target_top1_agreement


def _check_kind_settings(kind: str, config) -> None:
    """Gates and targets of the other model family are refused before training starts."""
    other = (("target_top1_agreement", "min_top1_agreement", "max_kl") if kind == "encoder"
             else ("target_mean_cosine", "min_mean_cosine", "min_cosine"))
    given = [name for name in other if getattr(config, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        this = "an encoder" if kind == "encoder" else "a causal LM"
        use = ("--min-mean-cosine, --min-cosine, --target-mean-cosine" if kind == "encoder"
               else "--min-top1-agreement, --max-kl, --target-top1-agreement")
        raise UserInputError(f"{flag} does not apply: this teacher is {this}; use {use}")


def _fmt_metrics(metrics: dict) -> str:
    keys = ("mean_cosine", "min_cosine", "retrieval_agreement", "top1_agreement", "kl")
    return ", ".join(f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys if metrics.get(k) is not None)


def run_training(source, student_dir, data_paths: list[Path], config, *, checkpoint_dir=None, resume: bool = False,
                 exclude=(), progress=None):
    """See `inferforge.optimize.distill.distill`."""
    import torch.distributed as dist

    from inferforge.optimize.distill import DistillResult
    from inferforge.optimize.distill_eval import evaluate_decoder, evaluate_encoder, teacher_embeddings
    from inferforge.optimize.distill_student import (
        StudentWithHeads,
        build_student,
        freeze_student_layers,
        load_teacher,
    )

    env = init_distributed()
    progress = progress if env.rank == 0 else None
    if resume and checkpoint_dir is None:
        raise UserInputError("--resume needs a checkpoint directory to resume from")
    latest = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and latest is None:
        raise UserInputError(f"--resume: no checkpoint in {checkpoint_dir}; run without --resume to start a new run")
    if not resume and latest is not None:
        raise UserInputError(f"{checkpoint_dir} holds a checkpoint of an earlier run (step {latest.name}); add "
                             "--resume to continue it, or remove that directory to start over")
    data = load_distill_data(data_paths, held_out_share=config.held_out_share, seed=config.seed, exclude=exclude)
    teacher = load_teacher(source.path)
    kind = teacher.kind
    _check_kind_settings(kind, config)
    hidden_weight = config.resolved_hidden_weight(kind)
    if not hidden_weight and (config.hidden_loss, config.hidden_layers) != ("mse", "all"):
        raise UserInputError("--hidden-loss / --hidden-layers shape the hidden-state loss, which is off for this "
                             f"{'encoder' if kind == 'encoder' else 'decoder'} (hidden weight 0): add --hidden-weight "
                             "(e.g. 1), or drop them")
    weights = ([config.embedding_weight] if kind == "encoder" else [config.kl_weight, config.task_weight])
    if not any(weights) and not hidden_weight:
        raise UserInputError("every loss weight is 0: nothing to train on; set a weight above 0")
    max_length = resolve_max_length(config.max_length, source.path, teacher.config)
    tokenizer = teacher.tokenizer
    pad = pad_id(tokenizer)
    if config.length_mix:
        data = with_length_mix(data, count_tokens=lambda text: len(tokenizer(text, truncation=False)["input_ids"]),
                               max_tokens=max_length, exclude=exclude)
    train_ids = tokenize_all(tokenizer, data.train, max_length)
    held_ids = tokenize_all(tokenizer, data.held_out, max_length)
    per_rank = config.batch_size // env.world
    if config.batch_size % env.world or per_rank % config.grad_accum:
        raise UserInputError(f"--batch-size {config.batch_size} must split evenly over {env.world} process(es) "
                             f"x {config.grad_accum} accumulation micro-batches")
    lengths = [len(t) for t in train_ids] if config.group_by_length else None

    def batch_at(step: int) -> tuple[int, int, np.ndarray]:
        return step_indices(step, seed=config.seed, n=len(train_ids), batch_size=config.batch_size, lengths=lengths)

    batch_at(0)   # the batch fits the data

    random.seed(config.seed)
    np.random.seed(config.seed)
    student, plan = build_student(teacher, config, student_dir, seed=config.seed)
    if config.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    if config.freeze_layers:
        freeze_student_layers(student, teacher.layer_prefix, config.freeze_layers)
    module = StudentWithHeads(student, kind, teacher.config.hidden_size, want_hidden=hidden_weight > 0)
    torch.manual_seed(config.seed + env.rank)   # dropout differs between ranks, as their data does
    module.to(env.device)
    teacher.model.to(env.device)
    train_module = module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda"
                                               else None, find_unused_parameters=True)
    # lr_schedule "time": the elapsed share of the training time, i.e. of the budget left when the first
    # step starts (the teacher cache has taken its part: a slow cache shortens the schedule but does not
    # skip the warm-up). Read once per step and agreed on by all ranks (the largest), so every replica
    # steps with the same learning rate.
    clock = {"started": None, "seconds": None, "share": 0.0}
    timed_schedule = config.lr_schedule == "time" and config.max_minutes is not None

    def update_time_share() -> None:
        share = torch.tensor([(time.monotonic() - clock["started"]) / clock["seconds"]], dtype=torch.float64)
        if env.distributed:
            dist.all_reduce(share, op=dist.ReduceOp.MAX)
        clock["share"] = float(share)

    optimizer, scheduler = _optimizer(module, config, (lambda: clock["share"]) if timed_schedule else None)
    settings = config.run_settings(kind)
    fingerprint = {"config": config.fingerprint(kind), "teacher": source.weights_sha256,
                   "data": [f["sha256"] for f in data.files], "student": plan, "world": env.world}
    start, history, earlier_seconds = 0, [], 0.0
    if latest is not None:
        state, rng_states = ckpt.load_checkpoint(latest, module=module, optimizer=optimizer, scheduler=scheduler)
        if state["fingerprint"] != fingerprint:
            raise UserInputError(f"the checkpoint in {checkpoint_dir} is of a different run "
                                 f"({ckpt.changes(state, fingerprint, settings)}); give the same teacher, data, "
                                 f"student and settings to continue it, or remove {checkpoint_dir} to start over")
        start, history = state["step"], state["history"]
        earlier_seconds = state.get("train_seconds", 0.0)
        ckpt.set_rng_state(rng_states[env.rank])
        # The optimizer state holds the learning rate of the checkpointed step under the old total of
        # steps; the first step of a longer run takes the new schedule's.
        factor = lr_factor(start, config.steps, config.warmup_share)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    autocast, autocast_teacher, autocast_eval = _autocast(env.device, config.precision, kind)
    cache_on = config.cache_teacher and kind == "encoder" and start < config.steps
    teacher_pooled = None
    if env.rank == 0 and kind == "encoder":
        teacher_pooled = teacher_embeddings(teacher.model, held_ids, pad, env.device, autocast_eval)

    def evaluate() -> dict:
        if kind == "encoder":
            return evaluate_encoder(module, teacher_pooled, held_ids, pad, env.device, autocast_eval)
        return evaluate_decoder(module, teacher.model, held_ids, pad, env.device, autocast_eval)

    def save(step: int) -> Path | None:
        rngs = [ckpt.rng_state()]
        if env.distributed:
            rngs = [None] * env.world
            dist.all_gather_object(rngs, ckpt.rng_state())
        path = None
        if env.rank == 0 and checkpoint_dir is not None:
            epoch, position, _ = batch_at(step)
            path = ckpt.save_checkpoint(checkpoint_dir, step=step, module=module, optimizer=optimizer,
                                        scheduler=scheduler, rng_states=rngs,
                                        state={"epoch": epoch, "position": position, "fingerprint": fingerprint,
                                               "settings": settings, "samples_seen": step * config.batch_size,
                                               "train_seconds": earlier_seconds + time.monotonic() - started,
                                               "history": history})
        if env.distributed:
            dist.barrier()
        return path

    started = time.monotonic()   # the time budget counts the teacher cache
    cache = _teacher_cache(teacher.model, train_ids, pad, env.device, autocast_teacher, progress,
                           layers=[j for _, j in hidden_pairs(plan["layer_map"], config.hidden_layers)]
                           if hidden_weight else None) if cache_on else None
    display = _Display(progress, config.steps, start)
    if start:
        display.line(f"resuming at step {start} of {config.steps} from {latest}")
    stopped, metrics, step = "steps", None, start
    last = clock["started"] = time.monotonic()
    if config.max_minutes is not None:
        clock["seconds"] = max(config.max_minutes * 60 - (last - started), 1e-3)
    try:
        with ckpt.StopFlag() as stop:
            for step in range(start, config.steps):
                _, _, indices = batch_at(step)
                micro_batches = np.array_split(rank_share(indices, env.rank, env.world), config.grad_accum)
                totals = accumulate_gradients(train_module, teacher.model, kind,
                                              [[train_ids[i] for i in micro] for micro in micro_batches], pad, config,
                                              hidden_weight, plan["layer_map"], world=env.world, device=env.device,
                                              autocast=autocast, teacher_autocast=autocast_teacher,
                                              targets_for=(lambda j, ids, batches=micro_batches: cache.targets(batches[j], ids.shape[1]))
                                              if cache is not None else None)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm))
                if timed_schedule:
                    update_time_share()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                step_seconds = time.monotonic() - last   # this step's training time, before evaluation and saving
                names = sorted(totals)
                timed_out = config.max_minutes is not None and time.monotonic() - started > config.max_minutes * 60
                evaluated = config.eval_every and done % config.eval_every == 0 and done < config.steps
                reached = False
                if evaluated and env.rank == 0:
                    metrics = evaluate()
                    reached = _target_reached(kind, metrics, config)
                flags = torch.tensor([totals[n] for n in names] + [float(bool(stop.requested)), float(timed_out),
                                                                   float(reached)], dtype=torch.float64)
                if env.distributed:
                    dist.all_reduce(flags)
                parts_mean = {n: float(flags[i]) / config.batch_size for i, n in enumerate(names)}
                row = {"step": done, "loss": sum(parts_mean.values()), **{f"loss_{n}": v for n, v in parts_mean.items()},
                       "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "samples_per_s": config.batch_size / max(step_seconds, 1e-9)}
                if evaluated and env.rank == 0:
                    row["eval"] = metrics
                    display.line(f"step {done}/{config.steps}: held-out {_fmt_metrics(metrics)}")
                history.append(row)
                display.step(done, f"loss {row['loss']:.4f}  {row['samples_per_s']:.1f} samples/s")
                signalled, timed_out, reached = (bool(flags[-3]), bool(flags[-2]), bool(flags[-1]))
                if signalled:
                    path = save(done)
                    display.close()
                    where = f"checkpoint saved to {path}" if path else "no checkpoint directory, nothing saved"
                    raise ckpt.DistillInterrupted(
                        f"interrupted ({stop.requested or 'signal'}) at step {done} of {config.steps}: {where}; "
                        "run the same command with --resume to continue")
                if reached or timed_out:
                    stopped = "target" if reached else "time"
                    break
                if done % config.save_every == 0 and done < config.steps:
                    path = save(done)
                    if path:
                        display.line(f"checkpoint: step {done} saved to {path}")
                last = time.monotonic()
            else:   # every step done; a checkpoint at or past `steps` trains no further and is re-evaluated
                done = max(config.steps, start)
            step = done
            final_metrics = evaluate() if env.rank == 0 else None
            if env.rank == 0:
                history.append({"step": step, "eval": final_metrics, "final": True})
            if checkpoint_dir is not None and step > start:
                path = save(step)
                if path:
                    display.line(f"checkpoint: step {step} saved to {path}")
    finally:
        display.close()
    if env.distributed:
        box = [final_metrics]
        dist.broadcast_object_list(box, src=0)
        final_metrics = box[0]
    display.line(f"held-out after {step} steps ({stopped}): {_fmt_metrics(final_metrics)}")
    return DistillResult(kind=kind, student=module.student.cpu().float().eval(), tokenizer=tokenizer, teacher=source,
                         data=data, config=config, plan={**plan, "max_length": max_length}, metrics=final_metrics,
                         history=history, stopped=stopped, step=step,
                         train_seconds=earlier_seconds + time.monotonic() - started,
                         checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, rank=env.rank)

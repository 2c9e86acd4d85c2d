"""`inferforge distill TEACHER ... --data FILE --output DIR`: train a smaller student, write it as an artifact.

Checkpoints go to `OUTPUT.checkpoints/` beside the artifact (kept after the run: `--resume` with a
larger `--steps` extends it). The same command runs under `torchrun --nproc_per_node N`; then only
rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from inferforge.errors import UserInputError

CHECKPOINTS_SUFFIX = ".checkpoints"


def checkpoint_dir_for(out: str | Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(out.name + CHECKPOINTS_SUFFIX)


def _share(text: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.1 or 10%, got {text!r}") from None
    return value


def add_distill_parser(sub, fmt) -> None:
    """Add the `distill` command to the subparsers `sub` (argparse formatter class `fmt`)."""
    p = sub.add_parser(
        "distill", formatter_class=fmt, help="train a smaller student model from a teacher (distillation)",
        description="Distil TEACHER (a BERT-style encoder or a Llama-family decoder) into a shallower student: "
                    "chosen teacher layers copied (--layers, --every-other), evenly spaced ones (--num-layers), a "
                    "narrower new model (--num-layers with --hidden-size) or a --student-config. Trains on --data with "
                    "a held-out split it never trains on, checkpoints to OUTPUT.checkpoints/ (resumable with "
                    "--resume, also after SIGINT/SIGTERM), and writes a Hugging Face student directory that is an "
                    "artifact (export, quantize, bench and inferforge.load take it) if the gate holds. Runs under "
                    "torchrun --nproc_per_node N as well (DistributedDataParallel).",
        epilog="examples:\n  inferforge distill all-MiniLM-L6-v2 --layers 0,3,5 --data fortunes.txt --data docs.txt "
               "--steps 300 --max-minutes 15 --min-mean-cosine 0.93 --output runs/minilm-l3\n"
               "  inferforge distill all-MiniLM-L6-v2 --layers 0,3,5 --data fortunes.txt --steps 600 --resume "
               "--output runs/minilm-l3\n"
               "  torchrun --nproc_per_node 2 -m inferforge distill ./llama --num-layers 4 --data text.jsonl "
               "--output runs/llama-l4\n"
               "exit codes: 0 ok, 1 the gate was missed (no artifact; checkpoints kept), 2 bad input, "
               "130 interrupted (checkpoint saved; --resume continues)")
    # `--layers -1,2` is a value, not an option: argparse takes "-1" and "-0.5" for numbers, and here a
    # comma-separated list of them too, so a negative index gets the one-line out-of-range error.
    p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    p.add_argument("teacher", metavar="TEACHER",
                   help="a Hugging Face model directory, 'all-MiniLM-L6-v2' (the demo model) or module:function")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--layers", help="teacher layers to keep, counted from 0, e.g. 0,3,5")
    student.add_argument("--every-other", action="store_true", help="keep teacher layers 0, 2, 4, ... (DistilBERT)")
    student.add_argument("--num-layers", type=int, metavar="N", help="a student of N layers, learning evenly spaced "
                                                                     "teacher layers")
    student.add_argument("--student-config", metavar="DIR", help="a directory with the student's config.json (and "
                                                                 "optionally weights); same vocabulary as the teacher")
    p.add_argument("--hidden-size", type=int, metavar="H", help="with --num-layers: a narrower student of width H, "
                                                                "compared through a learned projection")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="training text, repeatable: .txt (one passage per line) or .jsonl (a \"text\" field per line)")
    p.add_argument("--held-out-share", type=_share, default=0.1, metavar="SHARE",
                   help="share of the texts held out for evaluation, never trained on (default 0.1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per step, all processes together (default 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (default 3e-4)")
    p.add_argument("--warmup-share", type=_share, default=0.1, help="share of the steps of linear warm-up (default 0.1)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then evaluate and gate)")
    p.add_argument("--lr-schedule", choices=["steps", "time"], default="steps",
                   help="time: with --max-minutes, the warm-up and decay follow the elapsed share of the budget "
                        "when it is further along than the steps (default: steps)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate on the held-out texts every N steps "
                                                              "(default 50; 0: only at the end)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--max-length", type=int, help="tokens per text (default: the teacher's limit, at most 512)")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="batches of random texts (default: random batches of texts of similar length, less padding)")
    p.add_argument("--cache-teacher", action="store_true",
                   help="encoders: run the teacher once over the training texts and keep its outputs in memory "
                        "instead of once per step")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="the student's input token embeddings keep the teacher's values (not trained)")
    p.add_argument("--freeze-layers", metavar="I,J", help="student layers (from 0) whose weights keep their initial "
                                                          "values, e.g. 0 when it is the teacher's layer 0")
    p.add_argument("--dropout", type=float, help="the student's dropout while training, also written to its "
                                                 "config.json (default: the teacher config's; 0 turns it off)")
    p.add_argument("--length-mix", action="store_true",
                   help="add short queries (first 1-3 words) and long passages (texts joined to near --max-length) "
                        "made from the training texts, as the validate step's length buckets hold")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast on a GPU, float32 on a CPU; bf16 on a CPU trains the student "
                        "and computes an encoder teacher's targets with bf16 autocast (fast on CPUs with AMX or AVX-512 BF16); "
                        "evaluation stays float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the batch order and the init (default 0)")
    p.add_argument("--embedding-loss", choices=["cosine", "mse"], default="cosine",
                   help="encoders: loss on the mean-pooled embedding (default cosine)")
    p.add_argument("--hidden-weight", type=float, help="weight of the hidden-state loss (default 0 for encoders, "
                                                       "1 for decoders)")
    p.add_argument("--hidden-loss", choices=["mse", "cosine"], default="mse",
                   help="hidden-state loss per token: mse (default) or cosine (1 - cos, blind to scale)")
    p.add_argument("--hidden-layers", choices=["all", "last"], default="all",
                   help="which student layers the hidden-state loss compares with their teacher layers: all "
                        "(default) or only the last")
    p.add_argument("--kl-weight", type=float, default=1.0, help="decoders: weight of the KL on the logits (default 1)")
    p.add_argument("--task-weight", type=float, default=0.0,
                   help="decoders: weight of the next-token cross-entropy on the data (default 0)")
    p.add_argument("--temperature", type=float, default=2.0, help="decoders: softmax temperature of the KL (default 2)")
    p.add_argument("--target-mean-cosine", type=float, help="encoders: stop early at this held-out mean cosine")
    p.add_argument("--target-top1-agreement", type=_share, help="decoders: stop early at this held-out top-1 agreement")
    p.add_argument("--min-mean-cosine", type=float, help="gate (encoders): held-out mean cosine to the teacher")
    p.add_argument("--min-cosine", type=float, help="gate (encoders): held-out min cosine to the teacher")
    p.add_argument("--min-top1-agreement", type=_share, help="gate (decoders): held-out top-1 agreement, 0.9 or 90%%")
    p.add_argument("--max-kl", type=float, help="gate (decoders): held-out KL(teacher || student) per token")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUTPUT.checkpoints/")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory (the student)")
    p.add_argument("--name", help="artifact name (default: the output directory's name)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_distill)


def _indices(flag: str, text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: give comma-separated layer indices such as 0 or 0,1") from None


def config_from_args(args):
    from inferforge.optimize.distill import EVERY_OTHER, DistillConfig
    from inferforge.optimize.distill_student import parse_layers

    layers = EVERY_OTHER if args.every_other else parse_layers(args.layers) if args.layers else None
    if args.hidden_size is not None and args.num_layers is None:
        raise UserInputError("--hidden-size needs --num-layers (a new, narrower student); --layers and --every-other "
                             "keep the teacher's width")
    freeze_layers = _indices("--freeze-layers", args.freeze_layers)
    try:
        return DistillConfig(
            layers=layers, num_layers=args.num_layers, hidden_size=args.hidden_size, steps=args.steps,
            batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_share=args.warmup_share,
            max_minutes=args.max_minutes, lr_schedule=args.lr_schedule, eval_every=args.eval_every, save_every=args.save_every,
            held_out_share=args.held_out_share, max_length=args.max_length, seed=args.seed,
            group_by_length=args.group_by_length, cache_teacher=args.cache_teacher,
            freeze_embeddings=args.freeze_embeddings, freeze_layers=freeze_layers,
            dropout=args.dropout, length_mix=args.length_mix, precision=args.precision,
            embedding_loss=args.embedding_loss, hidden_weight=args.hidden_weight,
            hidden_loss=args.hidden_loss, hidden_layers=args.hidden_layers, kl_weight=args.kl_weight,
            task_weight=args.task_weight, temperature=args.temperature, target_mean_cosine=args.target_mean_cosine,
            target_top1_agreement=args.target_top1_agreement, min_mean_cosine=args.min_mean_cosine,
            min_cosine=args.min_cosine, min_top1_agreement=args.min_top1_agreement, max_kl=args.max_kl)
    except ValueError as e:
        flag = "--" + str(e).split()[0].replace("_", "-")
        raise UserInputError(f"{flag}: {e}") from None


def cmd_distill(args) -> int:
    from inferforge.cli import _progress
    from inferforge.manifest import check_output_dir
    from inferforge.models import materialize
    from inferforge.optimize import distill_checkpoint as ckpt
    from inferforge.optimize.calibration import check_text_file
    from inferforge.optimize.distill import distill
    from inferforge.optimize.distill_artifact import write_student_artifact

    config = config_from_args(args)
    out = Path(args.output).resolve()
    check_output_dir(out)   # before hours of training, not after
    for path in args.data:
        check_text_file(path, flag="--data")
    checkpoints = checkpoint_dir_for(out)
    progress = _progress(args)
    interrupted = (f"interrupted (SIGTERM) outside training: no artifact was written; run the same command again "
                   f"(with --resume if {checkpoints} holds a checkpoint)")
    with ckpt.sigterm_raises(interrupted), tempfile.TemporaryDirectory(
            prefix=".distill-teacher-", dir=out.parent if out.parent.is_dir() else None) as work:
        source = materialize(args.teacher, Path(work))
        try:
            result = distill(source, args.student_config, args.data, config, checkpoint_dir=checkpoints,
                             resume=args.resume, progress=progress)
            if result.rank != 0:
                return 0
            manifest = write_student_artifact(result, out, name=args.name, progress=None)
        finally:
            _finish_distributed()
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"artifact:    {out}")
        print(f"checkpoints: {checkpoints}")
        print(manifest["steps"][0]["summary"])
    return 0


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

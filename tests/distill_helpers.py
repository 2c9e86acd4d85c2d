"""Tiny teachers and text for the distillation tests (seeded, no downloads)."""

from pathlib import Path

import torch

DOCS = Path(__file__).parent / "data" / "python_docs.txt"


def save_tiny_bert(path: Path, *, layers: int = 3, vocab_size: int | None = None, seed: int = 0) -> Path:
    """A `layers`-layer, 32-wide BERT with the demo model's tokenizer, saved as a model directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inferforge.models import demo_model_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size or 30522, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(path)
    return Path(path)


def tiny_bert_teacher(path: Path, layers: int = 3):
    from inferforge.optimize.distill_student import load_teacher

    return load_teacher(save_tiny_bert(path, layers=layers))


# One step's token ids for the DDP gradient test: 4 texts of different lengths.
DDP_BATCH = [[101, 2023, 2003, 1037, 102], [101, 7592, 102], [101, 2088, 2003, 2312, 1012, 102], [101, 2023, 102]]


def step_gradient(teacher_dir, rank: int = 0, world: int = 1, init_file: str | None = None, out: str | None = None):
    """The gradient of one distillation step over DDP_BATCH (dropout off, a 1-layer student of
    `teacher_dir`): on one process, or as rank `rank` of `world` gloo processes under
    DistributedDataParallel, each taking its `rank_share` of the batch. Rank 0 saves it to `out`
    (torch.save) when given; returns it by parameter name."""
    import numpy as np
    import torch.distributed as dist

    from inferforge.optimize.distill import DistillConfig
    from inferforge.optimize.distill_data import rank_share
    from inferforge.optimize.distill_student import StudentWithHeads, build_student, load_teacher
    from inferforge.optimize.distill_train import accumulate_gradients

    torch.set_num_threads(1)
    teacher = load_teacher(teacher_dir)
    config = DistillConfig(layers=(0,), batch_size=len(DDP_BATCH))
    student, _ = build_student(teacher, config)
    module = StudentWithHeads(student, "encoder", 32, want_hidden=False).eval()
    train_module = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        train_module = DistributedDataParallel(module, find_unused_parameters=True)
    share = rank_share(np.arange(len(DDP_BATCH)), rank, world)
    accumulate_gradients(train_module, teacher.model, "encoder", [[DDP_BATCH[i] for i in share]], 0, config, 0.0,
                         [0], world=world)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    if world > 1:
        dist.destroy_process_group()
    if out is not None and rank == 0:
        torch.save(grads, out)
    return grads


def ddp_step_gradient_worker(rank: int, world: int, teacher_dir: str, init_file: str, out: str) -> None:
    """torch.multiprocessing.spawn's entry point for `step_gradient`."""
    step_gradient(teacher_dir, rank, world, init_file, out)

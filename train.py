"""Train an <ACT> video action classifier on Qwen2.5-VL.

    python train.py --config configs/synthetic.yaml                       # one process (CPU demo)
    torchrun --nproc_per_node 8 train.py --config configs/ucf101.yaml     # DDP, one node
    python train.py --config configs/ucf101.yaml --learning_rate 5e-5 --resume auto

Any config key can be overridden as `--key value`; the value is parsed as YAML, so lists and dicts
work (`--train_datasets '[{path: data/x.jsonl}]'`). `main(argv)` is the table of contents.
"""

import argparse
import dataclasses
import difflib
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Collator, DataError, VideoSettings, batch_stream, eval_batches, load_datasets, make_loader
from predict import confusion_image, view_probabilities, write_eval_outputs
from model import (build_classifier, build_optimizer, full_trainable_state, load_checkpoint, load_optimizer_state,
                   load_weights, optimizer_state, reshard_fsdp, shard_fsdp, write_checkpoint_files)


# ---------------------------------------------------------------------------------------------------
# Config: one typed dataclass is the schema; YAML + CLI overrides are checked against it.

@dataclass
class Config:
    # model
    model_name_or_path: str = "data/tiny-qwen2.5-vl"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    num_action_classes: int = 6  # classes of the "default" label space
    label_spaces: dict = field(default_factory=dict)  # extra heads: {name: num_classes}
    action_decoder_type: str = "linear"  # linear | mlp
    action_decoder_hidden_size: int | None = None  # mlp inner size (default: the model's hidden size)
    action_decoder_path: str | None = None  # initialise the head from ActionDecoder.save_pretrained output
    action_token_lr_scale: float = 0.1  # <ACT> row learning rate = learning_rate * this
    head_lr_scale: float = 1.0  # head learning rate = learning_rate * this
    # finetuning
    finetuning_type: str = "lora"  # lora | full | freeze
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target: str = "all"  # "all" Linear layers, or names: "q_proj,v_proj"
    use_dora: bool = False
    freeze_vision_tower: bool = True  # false: adapters (lora) or full training on the vision blocks too
    freeze_multi_modal_projector: bool = True  # false: the same for the merger
    additional_target: str | None = None  # modules trained fully besides adapters, e.g. "visual.patch_embed"
    # data
    train_datasets: list = field(default_factory=list)  # [{path, video_root, weight, label_space}]
    eval_datasets: list = field(default_factory=list)
    video_fps: float = 2.0  # frames sampled per second of video (LLaMA-Factory's default) ...
    video_maxlen: int = 128  # ... up to this many frames
    video_num_frames: int | None = None  # a fixed frame count instead of fps/maxlen
    video_max_pixels: int = 256 * 256  # per-frame pixel budget after resizing (sides multiples of 28)
    video_min_pixels: int = 16 * 16
    video_cache_dir: str | None = None  # opt-in cache of decoded, resized frames (see data.cached_clip)
    dataloader_num_workers: int = 0
    max_bad_video_fraction: float = 0.01  # unreadable videos are skipped and counted; more than this fails
    group_by_length: bool = False  # batch clips of similar token counts together (less padding)
    # optimisation
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 instead of DDP: parameters, gradients and Adam state sharded over the ranks (7B+)
    seed: int = 42
    # run directory
    output_dir: str = "runs/default"
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the end only
    save_steps: int = 0  # 0: save at the end only
    save_total_limit: int = 2
    resume: str | None = None  # "auto" (newest complete checkpoint in output_dir) or a checkpoint dir
    # evaluation
    eval_num_clips: int = 1  # temporal views per video (frame offsets shifted inside each segment)
    eval_num_crops: int = 1  # spatial views: 1 (whole frame) or 3 (start/centre/end squares)
    eval_only: bool = False  # evaluate `checkpoint` on eval_datasets, write eval.json, predictions.jsonl
    checkpoint: str | None = None


CHOICES = {"finetuning_type": ("lora", "full", "freeze"), "eval_num_crops": (1, 3), "action_decoder_type": ("linear", "mlp"),
           "lr_scheduler_type": ("cosine", "linear", "constant"),
           "attn_implementation": ("sdpa", "eager", "flash_attention_2")}
POSITIVE = ("num_action_classes", "lora_rank", "video_fps", "video_maxlen", "video_max_pixels",
            "video_min_pixels", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "logging_steps", "eval_num_clips")
NON_NEGATIVE = ("max_bad_video_fraction", "weight_decay", "lora_dropout", "max_grad_norm", "warmup_ratio", "warmup_steps",
                "dataloader_num_workers", "eval_steps", "save_steps", "save_total_limit", "action_token_lr_scale",
                "head_lr_scale")
DATASET_KEYS = {"path", "video_root", "weight", "label_space", "name"}


def type_ok(value, annotation):
    if annotation is typing.Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def coerce_floats(raw):
    """PyYAML reads `1e-4` (no dot) as a string; accept it where the key is a float."""
    hints = typing.get_type_hints(Config)
    for key, value in raw.items():
        if isinstance(value, str) and float in typing.get_args(hints.get(key)) + (hints.get(key),):
            try:
                raw[key] = float(value)
            except ValueError:
                pass
    return raw


def config_problems(raw):
    """Every problem with a raw {key: value} config, so they can be reported together."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    problems = []
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            problems.append(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        elif not type_ok(value, hints[key]):
            problems.append(f"{key}: expected {getattr(hints[key], '__name__', hints[key])}, got {value!r}")
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of {CHOICES[key]}")
        elif key in POSITIVE and value <= 0:
            problems.append(f"{key}: must be > 0, got {value!r}")
        elif key in NON_NEGATIVE and value < 0:
            problems.append(f"{key}: must be >= 0, got {value!r}")
    for key in ("train_datasets", "eval_datasets"):
        for i, entry in enumerate(raw.get(key) or []):
            if not isinstance(entry, dict) or "path" not in entry:
                problems.append(f"{key}[{i}]: expected {{path, video_root, weight, label_space, name}}, got {entry!r}")
            elif set(entry) - DATASET_KEYS:
                problems.append(f"{key}[{i}]: unknown key(s) {sorted(set(entry) - DATASET_KEYS)}; "
                                f"allowed: {sorted(DATASET_KEYS)}")
    return problems


def parse_config(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the experiment's keys")
    args, rest = parser.parse_known_args(argv)
    raw = {}
    if args.config is not None:
        with open(args.config, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise SystemExit(f"{args.config}: expected a mapping of config keys")
    while rest:  # `--key value`, the value parsed as YAML ("[a, b]" -> list); a bare `--flag` is true
        key = rest.pop(0)
        if not key.startswith("--"):
            raise SystemExit(f"overrides must be `--key value` pairs; {key!r} has no key before it")
        raw[key[2:]] = yaml.safe_load(rest.pop(0)) if rest and not rest[0].startswith("--") else True
    problems = config_problems(coerce_floats(raw))
    if not problems and not raw.get("eval_only") and not raw.get("train_datasets"):
        problems.append("train_datasets: at least one dataset is needed")
    if not problems and raw.get("eval_only") and not (raw.get("checkpoint") and raw.get("eval_datasets")):
        problems.append("eval_only needs --checkpoint DIR and eval_datasets")
    if problems:
        where = args.config if args.config is not None else "command line"
        raise SystemExit(f"config error(s) in {where}:\n  " + "\n  ".join(problems))
    return Config(**raw)


def head_sizes(cfg):
    sizes = {"default": cfg.num_action_classes, **cfg.label_spaces}
    for key in ("train_datasets", "eval_datasets"):
        for entry in getattr(cfg, key):
            space = entry.get("label_space", "default")
            if space not in sizes:
                raise SystemExit(f"{key}: label_space {space!r} of {entry['path']} is not declared; "
                                 f"add it to label_spaces: {{{space}: NUM_CLASSES}}")
    return sizes


# ---------------------------------------------------------------------------------------------------
# Distributed: torchrun or a plain `python train.py` (world size 1); one code path either way.

def setup_distributed():
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # plain `python train.py`: a world of one, on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:  # share the CPU cores between the local ranks instead of oversubscribing them
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def print0(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def all_reduce_sums(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def to_device(inputs, device):
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule (the optimizer's named groups: model.build_optimizer)

def total_steps(cfg, mix, world):
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    per_epoch = sum(round(w * c) // per_step for c, w in zip(mix.counts, mix.weights))
    return max(1, math.floor(per_epoch * cfg.num_train_epochs))


def lr_lambda(cfg, steps):
    """LambdaLR's factor at each step: linear warm-up, then cosine, linear or constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


# ---------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl (what tests and users parse) + TensorBoard, on rank 0 only

class MetricsLog:
    def __init__(self, output_dir, enabled, after_step=0):
        """Appends to metrics.jsonl; on resume, first drops the lines logged after the checkpoint
        (they will be logged again), so the file reads as one uninterrupted run."""
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            path = os.path.join(output_dir, "metrics.jsonl")
            kept = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
            self.file = open(path, "a")
            self.tb = SummaryWriter(output_dir, purge_step=after_step + 1 if after_step else None)

    def log(self, step, split, **values):
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def image(self, step, tag, make):
        """TensorBoard image; `make()` returns an HWC uint8 array and runs on rank 0 only."""
        if self.enabled:
            self.tb.add_image(tag, make(), step, dataformats="HWC")

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


# ---------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step_NNNNNNN, written to a temp folder and renamed, so a kill at any
# moment leaves the previous checkpoint whole. What a folder holds: model.write_checkpoint_files.

def checkpoint_dirs(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step_[0-9]*")))


def save_checkpoint(model, optimizer, state, cfg, classes, rank, device, best=False):
    """All ranks call this; rank 0 writes. `best`: also point checkpoints/best at it (a symlink
    replaced atomically; pruning never removes its target). Returns the checkpoint's folder."""
    root = os.path.join(cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"step_{state['step']:07d}")
    tmp = os.path.join(root, f".tmp_step_{state['step']:07d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))  # dropout masks resume too
    # Whole tensors, in the files a plain model loads. Under FSDP2 gathering them is a collective:
    # every rank takes part, rank 0 alone keeps and writes them.
    reshard_fsdp(model)
    weights = full_trainable_state(model, keep=rank == 0)
    optim = optimizer_state(model, optimizer, keep=rank == 0)
    dist.barrier()
    failed = 0.0
    if rank == 0:
        previous = checkpoint_dirs(cfg.output_dir)
        try:
            write_checkpoint_files(tmp, model, weights, optim, state, cfg, classes)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:  # disk full, quota, permissions: keep what we had, say so
            shutil.rmtree(tmp, ignore_errors=True)
            kept = previous[-1] if previous else "none"
            print(f"saving checkpoint {final} failed: {e}. The previous checkpoint ({kept}) is intact; "
                  f"free space and resume with --resume auto.", file=sys.stderr, flush=True)
            failed = 1.0
        else:
            if best:
                os.symlink(os.path.basename(final), os.path.join(root, ".best.tmp"))
                os.replace(os.path.join(root, ".best.tmp"), os.path.join(root, "best"))
            keep = os.path.realpath(os.path.join(root, "best"))
            for old in checkpoint_dirs(cfg.output_dir)[:-cfg.save_total_limit] if cfg.save_total_limit else []:
                if os.path.realpath(old) != keep:
                    shutil.rmtree(old, ignore_errors=True)
    if all_reduce_sums([failed], device)[0]:
        raise SystemExit(1)
    return final


def resume_dir(cfg):
    for tmp in glob.glob(os.path.join(cfg.output_dir, "checkpoints", ".tmp_step_*")):
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during a save; never complete
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    found = checkpoint_dirs(cfg.output_dir)
    return found[-1] if found else None


def load_training_state(directory, model, optimizer, scheduler, step, rank):
    """A resume, part 2, once the optimizer holds the (wrapped or sharded) model's parameters.
    Adam's moments come from the checkpoint; learning rates, decay and the schedule from this
    config (identical when it is unchanged, so resume stays exact; applied when it is changed)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_optimizer_state(os.path.join(directory, "optimizer.pt"), model, optimizer)
    for group, fresh in zip(optimizer.param_groups, hyper):
        group.update(fresh)
    scheduler.last_epoch = step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])


# ---------------------------------------------------------------------------------------------------
# Evaluation: every sample exactly once across ranks, views averaged as softmax probabilities

def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def eval_views(cfg):
    return [(c, cfg.eval_num_clips, k, cfg.eval_num_crops)
            for c in range(cfg.eval_num_clips) for k in range(cfg.eval_num_crops)]


def eval_loader(mix, collate, cfg, world, rank, views):
    """Built once: its workers persist from one evaluation to the next."""
    plan = [b for view in views for b in eval_batches(mix.counts, cfg.per_device_eval_batch_size, world, rank, view)]
    return make_loader(mix.dataset, plan, collate, cfg.dataloader_num_workers, cfg.seed)


def check_even_eval_batches(evals, world):
    """FSDP2: every forward all-gathers, so a rank with an extra eval batch would wait forever."""
    counts = [None] * world
    dist.all_gather_object(counts, len(evals))
    if len(set(counts)) > 1:
        raise SystemExit(f"fsdp: the ranks would run {counts} eval batches; each FSDP forward is a "
                         f"collective, so they must be equal: use an eval set whose size is a multiple "
                         f"of {world} x per_device_eval_batch_size")


def evaluate(model, loader, mix, cfg, device, num_views=1):
    """Per eval dataset: loss (of the view-averaged probabilities), top-1, top-5, mean per-class
    accuracy, count, and the confusion matrix; reduced across ranks as sums."""
    probs, skipped = view_probabilities(model, loader, num_views, autocast(cfg, device), device)
    sizes, results = head_sizes(cfg), {}
    for d, (name, space) in enumerate(zip(mix.names, mix.spaces)):  # the same order on every rank
        n = sizes[space]
        stats = torch.zeros(2 + n * n, dtype=torch.float64)  # loss sum, top-5 hits, confusion (true, predicted)
        for index, (p, label, _, _) in probs.items():
            if label < 0 or mix.entry_of(index) != d:
                continue
            stats[0] -= math.log(max(p[label].item(), 1e-12))
            stats[1] += float(label in p.topk(min(5, n)).indices)
            stats[2 + label * n + p.argmax().item()] += 1
        stats = torch.tensor(all_reduce_sums(stats.tolist(), device), dtype=torch.float64)
        confusion = stats[2:].view(n, n)
        count = confusion.sum().item()
        if count:
            per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
            seen = confusion.sum(1) > 0
            results[name] = {"label_space": space, "loss": stats[0].item() / count,
                             "top1": confusion.diag().sum().item() / count, "top5": stats[1].item() / count,
                             "mean_class_acc": per_class[seen].mean().item(), "count": int(count),
                             "confusion": confusion}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, skipped)
    return results, probs, sorted(set().union(*gathered))


def log_evaluation(log, step, results, classes, skipped):
    for name, r in results.items():
        scalars = {k: v for k, v in r.items() if k != "confusion"}
        log.log(step, "val", dataset=name, **scalars, skipped_videos=len(skipped))
        names = classes.get(r["label_space"], [str(i) for i in range(len(r["confusion"]))])
        log.image(step, f"val/{name}/confusion", lambda r=r, names=names: confusion_image(r["confusion"], names))
        print0(f"step {step} val[{name}] loss {r['loss']:.4f} top1 {r['top1']:.4f} top5 {r['top5']:.4f} "
               f"mean class acc {r['mean_class_acc']:.4f} ({r['count']} samples)")
    for message in skipped:
        print0(f"skipped unreadable video: {message}")


def run_eval_only(cfg, rank, world, device):
    """Evaluates cfg.checkpoint (weights only, no optimizer) with eval_num_clips x eval_num_crops
    views; writes eval.json, predictions.jsonl and confusion_<dataset>.png to output_dir."""
    mix = load_mix(cfg, cfg.eval_datasets)
    processor, model = build_classifier(cfg, head_sizes(cfg))
    load_weights(model.to(device), cfg.checkpoint)
    views = eval_views(cfg)
    loader = eval_loader(mix, Collator(processor, model.act_token_id), cfg, world, rank, views)
    results, probs, skipped = evaluate(model, loader, mix, cfg, device, len(views))
    samples = mix.dataset.samples  # a stand-in's probabilities never speak for an unreadable video
    rows = [(i, {"video": samples[i].video, "record": samples[i].source, "label": samples[i].label,
                 **({"top5": [[int(c), round(float(p[c]), 6)] for c in p.topk(min(5, len(p))).indices]}
                    if readable else {"error": "unreadable video"})})
            for i, (p, _, _, readable) in probs.items()]
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        rows = [row for _, row in sorted((r for part in gathered for r in part), key=lambda r: r[0])]  # record order
        write_eval_outputs(cfg, mix, results, rows, skipped)


# ---------------------------------------------------------------------------------------------------
# Training steps

def train_micro_step(ddp_model, batch, cfg, device, accumulation):
    with autocast(cfg, device):
        logits = ddp_model(batch["label_space"], **to_device(batch["inputs"], device)).float()
    labels = batch["labels"].to(device)
    loss = F.cross_entropy(logits, labels)
    (loss / accumulation).backward()
    return loss.item(), (logits.argmax(1) == labels).sum().item(), len(labels)


def optimizer_step(ddp_model, model, optimizer, scheduler, stream, state, cfg, device, skipped, stop):
    """gradient_accumulation_steps micro-batches, gradients reduced (DDP: all-reduce, FSDP2:
    reduce-scatter) on the last one only, then one update. Stops the run, before the update touches
    the weights, if any rank's loss is not finite. Returns the step's (loss_sum, correct, count) and
    whether any rank was asked to stop (one small all-reduce carries both flags)."""
    stats, bad = [0.0, 0.0, 0.0], None
    for micro in range(cfg.gradient_accumulation_steps):
        state["epoch"], state["position"], batch = next(stream)
        skipped.update(batch["skipped"])
        sync = micro == cfg.gradient_accumulation_steps - 1
        if cfg.fsdp:  # a switch, not a context: gradients accumulate unsharded, reduce-scattered on the last
            ddp_model.set_requires_gradient_sync(sync)
        with nullcontext() if sync or cfg.fsdp else ddp_model.no_sync():
            loss, correct, count = train_micro_step(ddp_model, batch, cfg, device, cfg.gradient_accumulation_steps)
        stats = [stats[0] + loss * count, stats[1] + correct, stats[2] + count]
        if not math.isfinite(loss) and bad is None:
            bad = f"loss {loss} in micro-batch {micro} (epoch {state['epoch']}, records {batch['sources']})"
    nonfinite, stopping = all_reduce_sums([bad is not None, stop.requested], device)
    if nonfinite:
        raise SystemExit(f"non-finite loss at step {state['step'] + 1}: {bad if bad else 'on another rank'}. "
                         f"Nothing was updated or saved; the last checkpoint is untouched. Lower the learning "
                         f"rate or check those records.")
    if cfg.max_grad_norm > 0:  # FSDP2: the grads are DTensor shards on one mesh. A shard's norm is a
        # DTensor pending a reduction over ranks (Partial), which DTensor all-reduces when the clip
        # factor is computed: every rank scales its shard by the same global-norm factor, as with DDP.
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, stopping > 0


def check_skipped(skipped, reported, upfront, total, cfg):
    """Unreadable videos found while training (on any rank) plus those missing up front: report the
    new ones, fail past max_bad_video_fraction of the training set. Returns how many were skipped."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(skipped))
    found = set().union(*gathered)
    for message in sorted(found - reported):
        print0(f"skipped unreadable video (another sample stood in): {message}")
    reported |= found
    if len(found) + upfront > cfg.max_bad_video_fraction * total:
        raise SystemExit(f"{len(found) + upfront} of {total} training videos are unreadable, more than "
                         f"max_bad_video_fraction={cfg.max_bad_video_fraction}:\n" + "\n".join(sorted(found)[:20]))
    return len(found)


class StopSignal:
    """SIGTERM (pre-emption) or SIGINT (Ctrl-C): finish the step, save, exit 0. DataLoader workers
    ignore SIGINT (see data.make_loader). A Ctrl-C more than 2 s after the first quits at once,
    unsaved; sooner ones are the same keypress relayed (torchrun forwards it to its ranks)."""

    def __init__(self):
        self.requested, self.name, self.since = 0, None, None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self.since > 2:
                raise KeyboardInterrupt
            return
        self.requested, self.name, self.since = 1, signal.Signals(signum).name, time.monotonic()
        if os.environ.get("RANK", "0") == "0":  # os.write: print() could re-enter a stream being written
            os.write(2, f"\n{self.name}: finishing this step, then saving a checkpoint "
                        f"(Ctrl-C again quits now, unsaved)\n".encode())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed()
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if rank == 0:  # an evaluation must not overwrite its training run's config
            with open(os.path.join(cfg.output_dir, "eval_config.yaml" if cfg.eval_only else "config.yaml"), "w") as f:
                yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        (run_eval_only if cfg.eval_only else train)(cfg, rank, world, device)
    finally:
        dist.destroy_process_group()


def load_mix(cfg, entries):
    settings = VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                             cfg.video_max_pixels, cfg.video_cache_dir)
    try:
        mix = load_datasets(entries, head_sizes(cfg), settings, cfg.max_bad_video_fraction, cfg.seed,
                            require_label=entries is cfg.train_datasets)
    except DataError as e:
        raise SystemExit(str(e)) from None
    if mix.warning is not None:
        print0(mix.warning)
    return mix


def train(cfg, rank, world, device):
    torch.manual_seed(cfg.seed + rank)
    train_mix = load_mix(cfg, cfg.train_datasets)
    eval_mix = load_mix(cfg, cfg.eval_datasets) if cfg.eval_datasets else None
    classes = {**(eval_mix.classes if eval_mix else {}), **train_mix.classes}
    processor, model = build_classifier(cfg, head_sizes(cfg))
    model.to(device)
    collate = Collator(processor, model.act_token_id)
    views = eval_views(cfg)
    evals = eval_loader(eval_mix, collate, cfg, world, rank, views) if eval_mix else None
    state = {"step": 0, "epoch": 0, "position": 0, "best_top1": None}
    start = resume_dir(cfg)
    if start is not None:  # weights first, into the plain model
        state = {**state, **load_checkpoint(start, model, cfg)}
    # ddp_model runs forward/backward; `model` has the names. Under FSDP2 they are one object.
    if cfg.fsdp and evals is not None:
        check_even_eval_batches(evals, world)
    ddp_model = (shard_fsdp(model, device, world) if cfg.fsdp
                 else DDP(model, find_unused_parameters=len(model.heads) > 1))
    optimizer = build_optimizer(model, cfg)  # after sharding: it must hold the DTensor parameters
    steps = total_steps(cfg, train_mix, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    if start is not None:
        load_training_state(start, model, optimizer, scheduler, state["step"], rank)
        print0(f"resumed from {start} at step {state['step']}")
    log = MetricsLog(cfg.output_dir, rank == 0, after_step=state["step"])
    stop = StopSignal()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{len(train_mix.dataset)} train samples, {world} rank(s), {steps} steps, {n_train:,} trainable parameters")
    try:
        train_loop(cfg, rank, world, device, model, ddp_model, optimizer, scheduler, train_mix, eval_mix, evals,
                   len(views), collate, classes, state, steps, log, stop)
    finally:
        log.close()
        stop.restore()


def train_loop(cfg, rank, world, device, model, ddp_model, optimizer, scheduler, train_mix, eval_mix, evals,
               num_views, collate, classes, state, steps, log, stop):
    stream = batch_stream(train_mix, collate, cfg, rank, world, state["epoch"], state["position"])
    upfront_bad = len(train_mix.bad_videos)
    total = len(train_mix.dataset) + upfront_bad
    window, skipped, reported = [0.0, 0.0, 0.0], set(), set()  # loss_sum, correct, count since the last log
    bar = tqdm(total=steps, initial=state["step"], disable=rank != 0, desc="train", dynamic_ncols=True)
    t0 = time.time()
    while state["step"] < steps:
        stats, stopping = optimizer_step(ddp_model, model, optimizer, scheduler, stream, state, cfg, device, skipped,
                                         stop)
        window = [w + x for w, x in zip(window, stats)]
        state["step"] += 1
        bar.update(1)
        last = state["step"] == steps
        if state["step"] % cfg.logging_steps == 0 or last or stopping:
            loss_sum, correct, count = all_reduce_sums(window, device)
            log.log(state["step"], "train", loss=loss_sum / count, top1=correct / count,
                    lr=optimizer.param_groups[0]["lr"], epoch=state["epoch"],
                    skipped_videos=check_skipped(skipped, reported, upfront_bad, total, cfg),
                    elapsed_s=round(time.time() - t0, 1))
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.2f}")
            window = [0.0, 0.0, 0.0]
        new_best = False
        # A stop saves without evaluating (pre-emption grace periods, often 30 s, are shorter than an
        # evaluation), except at the last step: a resume would never run that evaluation.
        eval_due = (cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or last
        if evals is not None and eval_due and (last or not stopping):
            results, _, eval_skipped = evaluate(ddp_model, evals, eval_mix, cfg, device, num_views)
            log_evaluation(log, state["step"], results, classes, eval_skipped)
            top1 = sum(r["top1"] for r in results.values()) / max(1, len(results))  # mean over datasets
            new_best = state["best_top1"] is None or top1 > state["best_top1"]
            state["best_top1"] = top1 if new_best else state["best_top1"]
        if (cfg.save_steps and state["step"] % cfg.save_steps == 0) or last or new_best or stopping:
            saved = save_checkpoint(model, optimizer, state, cfg, classes, rank, device, best=new_best)
        if stopping:
            print0(f"stopped by {stop.name} after step {state['step']}; checkpoint {saved}; "
                   f"continue with --resume auto")
            break
    bar.close()
    print0(f"done: {state['step']} steps in {time.time() - t0:.0f}s; checkpoints in {cfg.output_dir}/checkpoints")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # torchrun + transformers sometimes abort at interpreter exit

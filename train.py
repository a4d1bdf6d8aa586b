"""Train an <ACT> video action classifier on a Qwen-VL model (any family: model.py), or evaluate one.

    python train.py --config configs/synthetic.yaml                       # one process (CPU demo)
    torchrun --nproc_per_node 8 train.py --config configs/ucf101.yaml     # DDP, one node
    python train.py --config configs/ucf101.yaml --learning_rate 5e-5 --resume auto

Any config key (config.py) can be overridden as `--key value`; the value is parsed as YAML, so lists
and dicts work (`--train_datasets '[{path: data/x.jsonl}]'`). `main(argv)` is the table of contents;
`train` builds the run, `train_loop` runs it.
"""

import math
import os
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import distributed
import run_folder
from config import (Config, ConfigError, best_metric, changed_keys, class_weight_setting, head_sizes,
                    multi_label_spaces, saved_config, video_settings, write_config)
from batch_plan import StepLayout, resumed_position, steps_per_epoch
from data import USER_ERRORS, Collator, DatasetMix, Reading, hold_out, load_datasets
from loaders import batch_stream
from losses import LossSettings, class_weights, head_loss, multi_label_hits
from distributed import all_gather, all_reduce_sums, print0
from evaluation import (autocast, class_names, confusion_image, eval_loader, evaluate, prediction_rows,
                        write_eval_outputs)
from llamafactory import parse_config
from metrics import MetricsLog, check_reporters
from model import build_classifier, build_optimizer, load_processor, vision_geometry


def main(argv=None):
    notes = []  # LLaMA-Factory/IVCP keys: what was translated or ignored, and why
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__, notes=notes)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    rank, world, device = distributed.setup(cfg.ddp_timeout)
    for line in notes:
        print0(line)
    owner = None
    try:
        owner = run_folder.claim(cfg, rank)  # held until this process ends
        if rank == 0:  # an evaluation must not overwrite its training run's config
            name = "eval_config.yaml" if cfg.eval_only else "config.yaml"
            checkpoint.write_atomically(os.path.join(cfg.output_dir, name), lambda tmp: write_config(cfg, tmp))
        (run_eval_only if cfg.eval_only else train)(cfg, rank, world, device)
    except (*USER_ERRORS, run_folder.FolderTaken) as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        if not checkpoint.disk_full(e, e.filename or cfg.output_dir):
            raise
        failed = checkpoint.failed_write(e, e.filename or cfg.output_dir)
        if cfg.eval_only:
            raise SystemExit(f"{failed}. The evaluation's files were not written: free space, then run the same "
                             f"command again.") from None
        raise SystemExit(f"{failed}. The last complete checkpoint, {checkpoint.last_checkpoint(cfg.output_dir)}, is "
                         f"intact: free space, then continue with --resume auto.") from None
    finally:
        distributed.teardown()
        if owner is not None:
            owner.close()


def to_device(inputs, device):
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------
# The run: everything the loop touches, built once by `train`

@dataclass
class Run:
    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the ActionClassifier: parameter names, checkpoints, gradient clipping
    wrapped: torch.nn.Module  # runs forward/backward: DDP(model), or under FSDP2 `model` itself, sharded
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: typing.Iterator  # loaders.batch_stream: (epoch, position, batch), without end
    train_mix: DatasetMix
    eval_mix: DatasetMix | None  # None without eval_datasets
    evals: torch.utils.data.DataLoader | None
    classes: dict  # label_space -> class names (classes.json beside the datasets)
    steps: int  # optimizer steps in the whole run
    log: "MetricsLog"
    stop: "StopSignal"
    state: dict  # step, epoch, position (where the next batch comes from), best_metric: what a checkpoint keeps
    losses: dict = field(default_factory=dict)  # label_space -> losses.LossSettings (loss_settings)


def load_mix(cfg, entries, geometry):
    training = entries is cfg.train_datasets
    reading = Reading(training, cfg.max_samples if training else None, multi_label_spaces(cfg))
    mix = load_datasets(entries, head_sizes(cfg), video_settings(cfg, geometry), cfg.max_bad_video_fraction, cfg.seed,
                        reading)
    if mix.warning is not None:
        print0(mix.warning)
    return mix


def load_data_and_model(cfg, device):
    """The start-up training and --eval_only share: the processor first (its family's frame geometry
    scales the datasets' frames), the datasets (all records checked before the model loads), then
    the classifier on `device`. Returns (processor, model, train_mix or None, eval_mix or None)."""
    processor, _ = load_processor(cfg.model_name_or_path, cfg.trust_remote_code)
    geometry = vision_geometry(processor)
    train_mix = None if cfg.eval_only else load_mix(cfg, cfg.train_datasets, geometry)
    eval_mix = load_mix(cfg, cfg.eval_datasets, geometry) if cfg.eval_datasets else None
    if train_mix is not None and cfg.val_size > 0:  # the held-out part is the eval set (never with eval_datasets)
        train_mix, eval_mix = hold_out(train_mix, cfg.val_size, cfg.seed)
        print0(f"val_size {cfg.val_size}: {len(eval_mix.dataset)} training samples held out for evaluation")
    processor, model = build_classifier(cfg, head_sizes(cfg), processor)
    return processor, model.to(device), train_mix, eval_mix


def train(cfg, rank, world, device):
    torch.manual_seed(cfg.seed + rank)
    distributed.check_shared_output_dir(cfg.output_dir, rank, world)
    check_reporters(cfg)
    processor, model, train_mix, eval_mix = load_data_and_model(cfg, device)
    model.train()  # from_pretrained leaves the VLM in eval mode: no dropout, no gradient checkpointing
    collate = Collator(processor, model.act_token_id)
    evals = eval_loader(eval_mix, collate, cfg, world, rank) if eval_mix else None
    state = {"step": 0, "epoch": 0, "position": 0, "best_metric": None, "best_metric_name": None}
    start = checkpoint.resume_dir(cfg)
    if start is not None:  # weights first, into the plain model
        state.update(checkpoint.load_checkpoint(start, model, cfg))
        checkpoint.refuse_weights_only(start, state)
        compare_best_by(cfg, state)
    wrapped = (distributed.shard_fsdp(model, device, world) if cfg.fsdp
               else DDP(model, find_unused_parameters=len(model.heads) > 1))
    optimizer = build_optimizer(model, cfg)  # after sharding: it must hold the DTensor parameters
    layout = StepLayout(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world, rank)
    steps = total_steps(cfg, train_mix, layout)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    if start is not None:
        checkpoint.load_training_state(start, model, optimizer, scheduler, state["step"], rank)
        print0(f"resumed from {start} at step {state['step']}")
        for line in explain_resume(cfg, start, state, layout, layout_record(train_mix, layout, steps)):
            print0(line)
    state["layout"] = layout_record(train_mix, layout, steps)
    # training batches carry the answer's tokens only when the token loss needs them; evaluation never does
    train_collate = Collator(processor, model.act_token_id, answer_tokens=cfg.action_cls_token_loss_weight > 0)
    batches = batch_stream(train_mix, train_collate, cfg, layout, (state["epoch"], state["position"]))
    run = Run(cfg, rank, world, device, model, wrapped, optimizer, scheduler, batches, train_mix, eval_mix, evals,
              classes={**(eval_mix.classes if eval_mix else {}), **train_mix.classes}, steps=steps,
              log=MetricsLog(cfg, rank == 0, after_step=state["step"]), stop=StopSignal(rank), state=state,
              losses=loss_settings(cfg, train_mix, device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{len(train_mix.dataset)} train samples, {world} rank(s), {steps} steps, {n_train:,} trainable parameters")
    try:
        train_loop(run)
    finally:
        run.log.close()
        run.stop.restore()


def train_loop(run):
    cfg, state = run.cfg, run.state
    skipped = SkippedVideos(run.train_mix, cfg.max_bad_video_fraction)
    window = Tally()  # since the last log line
    bar = tqdm(total=run.steps, initial=state["step"], disable=run.rank != 0, desc="train", dynamic_ncols=True)
    t0 = time.time()
    while state["step"] < run.steps:
        tally, stopping = train_step(run, skipped)
        window += tally
        state["step"] += 1
        bar.update(1)
        last = state["step"] == run.steps
        if state["step"] % cfg.logging_steps == 0 or last or stopping:
            window = window.all_reduced(run.device)
            log_train(run, window, skipped.gather_and_check(), time.time() - t0)
            bar.set_postfix(loss=f"{window.loss:.3f}", acc=f"{window.top1:.2f}")
            window = Tally()
        # A stop saves without evaluating (pre-emption grace periods, often 30 s, are shorter than an
        # evaluation), except at the last step: a resume would never run that evaluation.
        eval_due = (cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or last
        new_best = False
        if run.evals is not None and eval_due and (last or not stopping):
            new_best = evaluate_and_track_best(run)
        if (cfg.save_steps and state["step"] % cfg.save_steps == 0) or last or new_best or stopping:
            saved = checkpoint.save(run, best=new_best)
        if stopping:
            print0(f"stopped by {run.stop.name} after step {state['step']}; checkpoint {saved}; "
                   f"continue with --resume auto")
            break
    bar.close()
    print0(f"done: {state['step']} steps in {time.time() - t0:.0f}s; checkpoints in {cfg.output_dir}/checkpoints")


# ---------------------------------------------------------------------------------------------------
# Resuming with a changed config: what changes, and where in the data the run picks up

# Keys that change which samples train, or their order.
DATA_ORDER_KEYS = ("train_datasets", "seed", "max_samples", "val_size", "group_by_length")


def layout_record(mix, layout, steps):
    """How this run cuts its data into steps; a checkpoint keeps it (state["layout"]) for a resume."""
    return {"per_step": layout.per_step, "accumulation": layout.accumulation, "world": layout.world,
            "train_counts": list(mix.counts), "steps": steps}


def explain_resume(cfg, start, state, layout, now):
    """The start-up lines of a resume: every key that differs from the checkpoint's config, old and
    new, then what the changes do to the exact continuation. Moves state["position"] into this
    run's micro-batches (`layout`: this run's StepLayout, `now`: its layout_record)."""
    changes = changed_keys(saved_config(os.path.join(start, checkpoint.CONFIG_FILE)), cfg)
    lines = [f"resume: {key} changed: {old!r} -> {new!r}" for key, old, new in changes]
    saved = state.pop("layout", None)
    if saved is None:  # a checkpoint of an older actcls: its data position is taken as it is
        return lines
    state["position"] = resumed_position(state["position"], saved, layout)
    where = f"step {state['position'] // layout.accumulation} of epoch {state['epoch']}"
    if saved["per_step"] != now["per_step"]:
        lines.append(f"resume: {saved['per_step']} -> {now['per_step']} samples a step (per_device_train_batch_size "
                     f"x gradient_accumulation_steps x ranks): the epoch is cut into other steps, so this is no "
                     f"longer an exact continuation. It picks up at {where} of the new plan, the first step after "
                     f"the samples already used; this epoch may repeat or leave out some samples.")
    elif (saved["world"], saved["accumulation"]) != (now["world"], now["accumulation"]):
        lines.append(f"resume: the same {now['per_step']} samples a step, now {now['world']} rank(s) x "
                     f"{now['accumulation']} micro-batch(es) (was {saved['world']} x {saved['accumulation']}): "
                     f"every step trains on the samples it would have, from {where}")
    data = [key for key, _, _ in changes if key in DATA_ORDER_KEYS]
    if saved["train_counts"] != now["train_counts"]:
        data.append(f"the training records ({saved['train_counts']} -> {now['train_counts']} samples)")
    if data:
        lines.append(f"resume: {', '.join(data)} changed: the samples or their order are not the checkpoint's. "
                     f"The run picks up at {where} of the new order, not where the checkpoint's order stopped.")
    if saved["steps"] != now["steps"]:
        lines.append(f"resume: the run now has {now['steps']} steps (was {saved['steps']}): the learning-rate "
                     f"schedule spans {now['steps']} steps and goes on from step {state['step']}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Training steps

@dataclass
class Tally:
    """Sums over training samples: cross-entropy, correct top-1 predictions, samples."""
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def __add__(self, other):
        return Tally(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)

    def all_reduced(self, device):
        """The sums over every rank (a collective)."""
        return Tally(*all_reduce_sums([self.loss_sum, self.correct, self.count], device))

    @property
    def loss(self):
        return self.loss_sum / self.count

    @property
    def top1(self):
        return self.correct / self.count


def loss_settings(cfg, mix, device):
    """{label_space: losses.LossSettings}: the type, label_smoothing_factor and class_weights
    ("balanced": from the training labels of that space; on `device`, once), printed when weighted."""
    multi, settings = multi_label_spaces(cfg), {}
    for space, n in head_sizes(cfg).items():
        setting = class_weight_setting(cfg, space)
        labels = [s.label for s in mix.dataset.samples if s.label_space == space]
        w = class_weights(setting, labels, n, space in multi)
        on_device = w.to(device) if w is not None else None
        settings[space] = LossSettings(cfg.label_smoothing_factor, on_device, space in multi, setting == "balanced")
        if w is not None:
            kind = "BCE pos_weight" if space in multi and setting == "balanced" else "class weights"
            print0(f"{kind} of label space {space!r} ({setting if isinstance(setting, str) else 'given'}): "
                   f"{[round(x, 4) for x in w.tolist()]}")
    return settings


def train_micro_step(run, batch):
    """Backward of the head's loss (CE, or BCE in a multi-label space: losses.head_loss) (+
    action_cls_token_loss_weight x the answer's LM loss, when the batch carries answer_mask). The
    Tally counts the head's loss alone; top-1 of a multi-label row: its best class is a positive."""
    with autocast(run.cfg, run.device):
        out = run.wrapped(batch.label_space, **to_device(batch.inputs, run.device))
    logits, lm_loss = out if isinstance(out, tuple) else (out, None)
    labels = batch.labels.to(run.device)
    settings = run.losses[batch.label_space]
    loss = head_loss(logits, labels, settings)
    total = loss if lm_loss is None else loss + run.cfg.action_cls_token_loss_weight * lm_loss
    (total / run.cfg.gradient_accumulation_steps).backward()
    ce = loss.item()
    if lm_loss is not None and not math.isfinite(lm_loss.item()):
        ce = math.nan  # so a non-finite LM loss stops the run as a non-finite CE does
    count, correct = (multi_label_hits(logits, labels) if settings.multi_label else
                      (len(labels), (logits.argmax(1) == labels).sum().item()))
    return Tally(ce * count, correct, count)


def train_step(run, skipped):
    """One whole optimizer step: gradient_accumulation_steps micro-batches, gradients reduced (DDP:
    all-reduce, FSDP2: reduce-scatter) on the last one only; one small all-reduce that carries both
    "a rank's loss is not finite" (the run stops before the update touches the weights) and "a rank
    was asked to stop"; then the update. Returns this rank's Tally and whether the run stops."""
    cfg, state = run.cfg, run.state
    tally, bad = Tally(), None
    for micro in range(cfg.gradient_accumulation_steps):
        state["epoch"], state["position"], batch = next(run.batches)
        skipped.add(batch.skipped)
        sync = micro == cfg.gradient_accumulation_steps - 1
        if cfg.fsdp:  # a switch, not a context: gradients accumulate unsharded, reduce-scattered on the last
            run.wrapped.set_requires_gradient_sync(sync)
        with nullcontext() if sync or cfg.fsdp else run.wrapped.no_sync():
            micro_tally = train_micro_step(run, batch)
        tally += micro_tally
        if not math.isfinite(micro_tally.loss) and bad is None:
            bad = f"loss {micro_tally.loss} in micro-batch {micro} (epoch {state['epoch']}, records {batch.sources})"
    nonfinite, stopping = all_reduce_sums([bad is not None, run.stop.requested], run.device)
    if nonfinite:
        raise SystemExit(f"non-finite loss at step {state['step'] + 1}: {bad if bad else 'on another rank'}. "
                         f"Nothing was updated or saved; the last checkpoint is untouched. Lower the learning "
                         f"rate or check those records.")
    if cfg.max_grad_norm > 0:  # FSDP2: the grads are DTensor shards on one mesh. A shard's norm is a
        # DTensor pending a reduction over ranks (Partial), which DTensor all-reduces when the clip
        # factor is computed: every rank scales its shard by the same global-norm factor, as with DDP.
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return tally, stopping > 0


class SkippedVideos:
    """Unreadable videos met while training (each rank meets its own, in its batches) plus those
    missing up front: reported once each; more than max_bad_video_fraction of the set stops the run."""

    def __init__(self, mix, max_fraction):
        self.upfront, self.total = len(mix.bad_videos), len(mix.dataset) + len(mix.bad_videos)
        self.max_fraction = max_fraction
        self.mine, self.reported = set(), set()

    def add(self, messages):
        self.mine.update(messages)

    def gather_and_check(self):
        """A collective (every rank calls it at the same step): all ranks' videos are gathered, the
        new ones reported. Returns how many were met so far."""
        found = set().union(*all_gather(sorted(self.mine)))
        for message in sorted(found - self.reported):
            print0(f"skipped unreadable video (another sample stood in): {message}")
        self.reported |= found
        if len(found) + self.upfront > self.max_fraction * self.total:
            raise SystemExit(f"{len(found) + self.upfront} of {self.total} training videos are unreadable, more "
                             f"than max_bad_video_fraction={self.max_fraction}:\n" + "\n".join(sorted(found)[:20]))
        return len(found)


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule (the optimizer's named groups: model.build_optimizer)

def total_steps(cfg, mix, layout):
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.floor(steps_per_epoch(mix.counts, mix.weights, layout.per_step) * cfg.num_train_epochs))


def lr_lambda(cfg, steps):
    """LambdaLR's factor at each step: linear warm-up, then cosine, linear, constant or polynomial.
    The factor scales every optimizer group alike (heads and <ACT> keep their lr ratios)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * steps)
    # polynomial: Hugging Face's get_polynomial_decay_schedule_with_warmup after the warm-up: from
    # learning_rate down to lr_end (default 1e-7) as (1 - progress) ** power, then lr_end.
    power = cfg.lr_scheduler_kwargs.get("power", 1.0)
    lr_end = cfg.lr_scheduler_kwargs.get("lr_end", 1e-7)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1 - progress)
        if cfg.lr_scheduler_type == "polynomial":
            remaining = max(0.0, 1 - progress)
            return ((cfg.learning_rate - lr_end) * remaining ** power + lr_end) / cfg.learning_rate
        return 1.0
    return factor


# ---------------------------------------------------------------------------------------------------
# Evaluation during training, and --eval_only (the shared core: evaluation.py)

def evaluate_and_track_best(run):
    """Evaluates, logs, and returns whether metric_for_best_model (its mean over the eval datasets)
    is a new best: higher for top1/top5/mean_class_acc, lower for loss."""
    results, _, skipped = evaluate(run.wrapped, run.evals, run.eval_mix, run.cfg, run.device)
    log_evaluation(run, results, skipped)
    key, higher_is_better = best_metric(run.cfg.metric_for_best_model)
    values = [r[key] for r in results.values() if key in r]  # mAP: multi-label datasets only, mean_class_acc: single
    value = sum(values) / max(1, len(values))
    best = run.state["best_metric"]
    new_best = best is None or (value > best if higher_is_better else value < best)
    if new_best:
        run.state.update(best_metric=value, best_metric_name=key)
    return new_best


def compare_best_by(cfg, state):
    """A resumed state's best value counts only for the metric this config ranks by: a best of
    another metric does not compare."""
    if state.get("best_metric_name") not in (None, best_metric(cfg.metric_for_best_model)[0]):
        print0(f"metric_for_best_model is now {cfg.metric_for_best_model}; checkpoints/best was picked by "
               f"{state['best_metric_name']}, so the next evaluation starts the comparison afresh")
        state.update(best_metric=None, best_metric_name=None)


def log_evaluation(run, results, skipped):
    step = run.state["step"]
    for name, r in results.items():
        if r.get("multi_label"):
            log_multi_label(run, name, r, len(skipped))
            continue
        scalars = {k: v for k, v in r.items() if k != "confusion"}
        run.log.log(step, "val", dataset=name, **scalars, skipped_videos=len(skipped))
        names = class_names(run.classes, r["label_space"], len(r["confusion"]))
        run.log.image(step, f"val/{name}/confusion", lambda r=r, names=names: confusion_image(r["confusion"], names))
        print0(f"step {step} val[{name}] loss {r['loss']:.4f} top1 {r['top1']:.4f} top5 {r['top5']:.4f} "
               f"mean class acc {r['mean_class_acc']:.4f} ({r['count']} samples)")
    for message in skipped:
        print0(f"skipped unreadable video: {message}")


def log_multi_label(run, name, r, num_skipped):
    """A multi-label dataset's eval line: mAP, per-class AP (null where a class has no positive), top-1/5."""
    run.log.log(run.state["step"], "val", dataset=name, **{k: v for k, v in r.items() if k != "multi_label"},
                skipped_videos=num_skipped)
    print0(f"step {run.state['step']} val[{name}] loss {r['loss']:.4f} mAP {r['mAP']:.4f} top1 {r['top1']:.4f} "
           f"top5 {r['top5']:.4f} ({r['count']} samples; {r['classes_without_positives']} classes without positives "
           f"left out of mAP)")


def log_train(run, window, num_skipped, elapsed):
    run.log.log(run.state["step"], "train", loss=window.loss, top1=window.top1,
                lr=run.optimizer.param_groups[0]["lr"], epoch=run.state["epoch"], skipped_videos=num_skipped,
                elapsed_s=round(elapsed, 1))


def run_eval_only(cfg, rank, world, device):
    """Evaluates cfg.checkpoint (weights only, no optimizer) with eval_num_clips x eval_num_crops
    views; writes eval.json, predictions.jsonl and confusion_<dataset>.png to output_dir."""
    processor, model, _, mix = load_data_and_model(cfg, device)
    if checkpoint.folder_kind(cfg.checkpoint) == "checkpoint":
        checkpoint.check_base_model(cfg.checkpoint, cfg)
    checkpoint.load_weights(model, cfg.checkpoint)  # weights only: no optimizer, no trainer state
    loader = eval_loader(mix, Collator(processor, model.act_token_id), cfg, world, rank)
    results, probs, skipped = evaluate(model, loader, mix, cfg, device)
    gathered = all_gather(prediction_rows(probs, mix.dataset.samples))
    if rank == 0:
        rows = [row for _, row in sorted((r for part in gathered for r in part), key=lambda r: r[0])]  # record order
        write_eval_outputs(cfg, mix, results, rows, skipped)


# ---------------------------------------------------------------------------------------------------
# Stopping on a signal

class StopSignal:
    """SIGTERM (pre-emption) or SIGINT (Ctrl-C): finish the step, save, exit 0. DataLoader workers
    ignore SIGINT (loaders.make_loader). A Ctrl-C more than 2 s after the first quits at once,
    unsaved; sooner ones are the same keypress relayed (torchrun forwards it to its ranks)."""

    def __init__(self, rank):
        self.rank, self.requested, self.name, self.since = rank, 0, None, None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self.since > 2:
                raise KeyboardInterrupt
            return
        self.requested, self.name, self.since = 1, signal.Signals(signum).name, time.monotonic()
        if self.rank == 0:  # os.write: print() could re-enter a stream being written
            os.write(2, f"\n{self.name}: finishing this step, then saving a checkpoint "
                        f"(Ctrl-C again quits now, unsaved)\n".encode())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # torchrun + transformers sometimes abort at interpreter exit

"""The checkpoint on disk: what a folder holds, writing it atomically, reading and checking it, and
which one a run resumes from.

    output_dir/checkpoints/step_NNNNNNN/   written by `save` (all ranks call it, rank 0 writes)
        trainable.safetensors              what trains in the backbone (adapters / trained layers, <ACT> row)
        heads/<label_space>/               ActionDecoder.save_pretrained + nothing else
        optimizer.pt                       Adam's state keyed by parameter name (no scheduler: the schedule
                                           is a function of the step)
        rng_rank<r>.pt                     each rank's RNG, so dropout masks resume too
        config.yaml, classes.json          the run's config, the class names of every head
        trainer_state.json                 step, epoch, position, best metric, the base model's fingerprint
    output_dir/checkpoints/best            a symlink to the best evaluated step

The frozen base comes from model_name_or_path again, so a checkpoint holds only what trains. An
export.py folder is told apart by its actcls.json (`folder_kind`). Every file the project writes for
a user goes through `write_atomically` (temp name, fsync, rename): a kill at any moment leaves the
previous version whole.
"""

import errno
import glob
import hashlib
import json
import os
import pickle
import shutil
import sys
import zipfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from config import write_config
from decoder import ActionDecoder
from distributed import all_reduce_sums, print0, reshard_fsdp

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
OPTIMIZER_FILE = "optimizer.pt"
CLASSES_FILE = "classes.json"
EXPORT_FILE = "actcls.json"  # marks an export folder; its schema: inference.VideoClassifier.manifest
EXPORT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded into this model/config; the message says why."""


# ---------------------------------------------------------------------------------------------------
# Atomic writes: the one helper every writer uses

def temp_path(path):
    """Where `path` is written before the rename: a hidden name beside it (same filesystem)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")


def write_atomically(path, write):
    """write(tmp) writes a file or a folder at `tmp`; it is then fsynced and renamed over `path`,
    so readers see the old version or the new one, never a part. A failure removes the temp and
    raises. A folder `path` is replaced whole (the old one is removed just before the rename)."""
    tmp = temp_path(path)
    remove(tmp)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        remove(tmp)


def publish(tmp, path):
    """fsync everything under `tmp`, then rename it to `path` and fsync the parent folder."""
    for name in written_files(tmp):
        with open(name, "rb") as f:
            os.fsync(f.fileno())
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def written_files(path):
    """The files a write put at `path`: itself, or everything under a folder (a symlink: none)."""
    if os.path.islink(path):
        return []
    if os.path.isfile(path):
        return [path]
    return [os.path.join(folder, name) for folder, _, files in os.walk(path) for name in files]


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_text(path, text):
    write_atomically(path, lambda tmp: open_and_write(tmp, text))


def open_and_write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path):
    """A JSON file of a checkpoint or an export; CheckpointError naming it when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None


# ---------------------------------------------------------------------------------------------------
# What a folder is

def folder_kind(directory):
    """"checkpoint" (a step_* folder or best), "export" (export.py's), "run" (an output_dir),
    "peft" (a LLaMA-Factory/IVCP adapter), "missing", or None (something else)."""
    if not os.path.isdir(directory):
        return "missing"
    if os.path.isfile(os.path.join(directory, EXPORT_FILE)):
        return "export"
    if all(os.path.isfile(os.path.join(directory, name)) for name in (TRAINABLE_FILE, CONFIG_FILE, STATE_FILE)):
        return "checkpoint"
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        return "run"
    if any(os.path.isfile(os.path.join(directory, n)) for n in ("adapter_model.safetensors", "adapter_config.json")):
        return "peft"
    return None


def checkpoint_problem(directory):
    """Why a checkpoint folder cannot be read, or None. Every file a resume reads is opened the way it
    will be read (safetensors headers checked against the file size, zip archives' directories,
    JSON parsed), cheaply: tensors stay on disk. Whether the weights fit this model is
    load_checkpoint's business, not this."""
    if not os.path.isdir(directory):
        return "not a folder"
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            trainer = json.load(f)
        trainer["step"]
        for name in [TRAINABLE_FILE] + [os.path.join("heads", space, "action_decoder.safetensors")
                                        for space in os.listdir(os.path.join(directory, "heads"))]:
            with safe_open(os.path.join(directory, name), "pt"):
                pass
        optimizer = [] if trainer.get("weights_only") else [OPTIMIZER_FILE]  # save_only_model: weights alone
        for name in optimizer + [n for n in os.listdir(directory) if n.startswith("rng_rank")]:
            if not os.path.isfile(os.path.join(directory, name)):
                return f"{name} is missing"
            if not zipfile.is_zipfile(os.path.join(directory, name)):  # torch.save writes zip archives
                return f"{name} is not a torch.save archive (damaged, or not written by actcls)"
            torch.load(os.path.join(directory, name), weights_only=True, mmap=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        # missing file, bad JSON, truncated header or zip, a pickle torch.load(weights_only) refuses
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return None


def read_classes(directory):
    """A checkpoint's classes.json: {label_space: [names]}; absent means class indices as names."""
    path = os.path.join(directory, CLASSES_FILE)
    if not os.path.exists(path):
        return {}
    classes = read_json(path)
    if not isinstance(classes, dict):
        raise CheckpointError(f"{path}: expected {{label_space: [class names]}}, got a {type(classes).__name__}")
    return classes


# ---------------------------------------------------------------------------------------------------
# Weights: only what trains is saved (adapters / trained layers, the <ACT> row, the heads)

def full_trainable_state(model, keep=True):
    """Every trainable parameter (adapters / trained layers, the <ACT> row, the heads) by name, as a
    whole CPU tensor. Under FSDP2 each parameter is a DTensor shard and `full_tensor()` all-gathers
    it: a collective, so then every rank must call this (the same parameters in the same order:
    named_parameters). `keep=False`, on ranks that do not write: gather and drop, so only the
    writer holds a CPU copy (one whole parameter at a time elsewhere)."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            if keep:
                state[name] = whole.contiguous().cpu()
    return state


def save_weights(model, directory, state=None):
    """`state`: full_trainable_state(model) gathered beforehand (FSDP2: every rank gathers, one
    writes); by default it is gathered here. The files are the same either way, so a checkpoint
    written by a sharded run loads into a plain model (load_weights, predict.py, a DDP resume)."""
    state = full_trainable_state(model) if state is None else state
    os.makedirs(directory, exist_ok=True)
    save_file({k: v for k, v in state.items() if not k.startswith("heads.")}, os.path.join(directory, TRAINABLE_FILE))
    for space, head in model.heads.items():
        prefix = f"heads.{space}."
        with torch.device("meta"):  # a plain twin to write from (the model's own may be sharded); no RNG drawn
            twin = ActionDecoder(**head.config)
        twin.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, assign=True)
        twin.save_pretrained(os.path.join(directory, "heads", space))


def load_weights(model, directory):
    """Loads what save_weights wrote. Every key must match both ways: a checkpoint from another
    model, LoRA setting or head layout is an error, never a silent partial load. Into a plain
    model: train.py loads before FSDP2 shards it (DTensor parameters do not take copy_ from a whole tensor)."""
    try:
        state = load_file(os.path.join(directory, TRAINABLE_FILE))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory}: cannot read {TRAINABLE_FILE} ({e}); is it a checkpoints/step_* "
                              f"folder?") from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory} does not match this model/config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"checkpoint {directory}: {name} has shape {tuple(value.shape)}, "
                                      f"this model expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    for space, head in model.heads.items():
        saved = ActionDecoder.from_pretrained(os.path.join(directory, "heads", space))
        if saved.config != head.config:
            raise CheckpointError(f"checkpoint {directory}: head {space!r} is {saved.config}, the config asks for "
                                  f"{head.config}")
        head.load_state_dict(saved.state_dict())


# ---------------------------------------------------------------------------------------------------
# Optimizer state, keyed by parameter name

def optimizer_state(model, optimizer, keep=True):
    """optimizer.state_dict() keyed by parameter name instead of position, with whole CPU tensors:
    the layout of torch.distributed.checkpoint's full optimizer state dict, so one optimizer.pt
    loads sharded or not. FSDP2's Adam moments are DTensor shards, all-gathered here: a collective,
    every rank calls this; `keep=False` ranks drop the result (only the writer holds a copy)."""
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for group in optimizer.param_groups for p in group["params"]]  # position -> name
    packed = optimizer.state_dict()
    state = {}
    for i in sorted(packed["state"]):  # the same order on every rank
        whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in packed["state"][i].items()}
        if keep:
            state[names[i]] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in whole.items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in packed["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(path, model, optimizer):
    """Loads optimizer_state's file into `optimizer`, sharding each moment like its parameter when
    that is a DTensor. Not torch.distributed.checkpoint's set_optimizer_state_dict: a fresh
    optimizer gets a zero-gradient warm-up step there, so a parameter without saved state (a head
    not trained yet) would resume at Adam step 1 instead of 0 (inexact), and its strict mode
    rejects such a parameter. Group names and parameter names must match exactly."""
    saved = torch.load(path, weights_only=True)
    name_of = {p: n for n, p in model.named_parameters()}
    mine = [(g["name"], [name_of[p] for p in g["params"]]) for g in optimizer.param_groups]
    theirs = [(g.get("name"), g["params"]) for g in saved["param_groups"]]
    unknown = sorted(set(saved["state"]) - {n for _, names in mine for n in names})
    if mine != theirs or unknown:
        raise CheckpointError(f"{path} does not match this model/config's optimizer groups: saved "
                              f"{[(g, len(ns)) for g, ns in theirs]}, expected {[(g, len(ns)) for g, ns in mine]}"
                              + (f"; unknown parameters {unknown[:5]}" if unknown else ""))

    def like(value, param):
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
            # each rank keeps its own slice of the whole tensor (src_data_rank=None: no communication)
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return value

    state, groups, position = {}, [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        ids = list(range(position, position + len(group["params"])))
        for i, p in zip(ids, group["params"]):
            if name_of[p] in saved["state"]:
                state[i] = {k: like(v, p) for k, v in saved["state"][name_of[p]].items()}
        groups.append({**saved_group, "params": ids})
        position += len(ids)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------
# The base model a checkpoint belongs to

def base_model_fingerprint(cfg):
    """Which base weights a checkpoint's adapters belong to: the path, the family (model_type:
    qwen2_5_vl, qwen3_vl, ...) and its config's hash."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model_name_or_path": cfg.model_name_or_path, "model_type": config.model_type, "config_sha256": digest}


def check_base_model(directory, cfg):
    """A checkpoint's weights only fit the base model they were trained on (its trainer_state.json
    says which): another family is one error, another size or config of the same family another."""
    saved_base = read_json(os.path.join(directory, STATE_FILE))["base_model"]
    base = base_model_fingerprint(cfg)
    if saved_base["model_type"] != base["model_type"]:
        raise CheckpointError(f"{directory} was trained on a {saved_base['model_type']} model "
                              f"({saved_base['model_name_or_path']}), but this config's model_name_or_path "
                              f"{base['model_name_or_path']} is a {base['model_type']} model: a checkpoint only "
                              f"loads onto its own family; point model_name_or_path at the checkpoint's base model")
    if saved_base["config_sha256"] != base["config_sha256"]:
        raise CheckpointError(f"{directory} was trained on {saved_base['model_name_or_path']}, but this config's "
                              f"model_name_or_path is {base['model_name_or_path']} (a different architecture/config): "
                              f"point model_name_or_path at the checkpoint's base model")


def load_checkpoint(directory, model, cfg):
    """The weights of a checkpoint folder into the plain model (before DDP or FSDP2 wraps it), after
    checking that every file can be read and that it belongs to this base model. Returns the trainer
    state (step, epoch, position, best_metric, and weights_only for save_only_model)."""
    if folder_kind(directory) != "checkpoint":
        raise CheckpointError(f"{directory} is not a checkpoint folder (no {STATE_FILE}): pass a "
                              f"checkpoints/step_NNNNNNN folder")
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(f"{directory}: the checkpoint cannot be read ({problem})")
    state = read_json(os.path.join(directory, STATE_FILE))
    state.pop("base_model")
    check_base_model(directory, cfg)
    load_weights(model, directory)
    return state


# ---------------------------------------------------------------------------------------------------
# Saving during training: checkpoints/step_NNNNNNN, the best link, rotation

def checkpoint_dirs(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step_[0-9]*")))


def save(run, best=False):
    """All ranks call this; rank 0 writes `run.state` (step, ...) with the weights, optimizer and
    every rank's RNG into checkpoints/step_NNNNNNN through a temp folder. `best`: also point
    checkpoints/best at it. Returns the folder; a failed write (disk full) stops the run with the
    previous checkpoint intact. `run`: train.Run (cfg, rank, device, model, optimizer, state, classes)."""
    root = os.path.join(run.cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"step_{run.state['step']:07d}")
    tmp = temp_path(final)
    if run.rank == 0:
        remove(tmp)
        os.makedirs(tmp)
    dist.barrier()
    failed = False
    if not run.cfg.save_only_model:  # save_only_model: weights only (no optimizer, no RNG), no resume
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if run.device.type == "cuda" else {})}
        rng_file = os.path.join(tmp, f"rng_rank{run.rank}.pt")  # dropout masks resume too
        failed = not written(lambda: torch.save(rng, rng_file), rng_file, final, run.cfg.output_dir)
    # Whole tensors, in the files a plain model loads. Under FSDP2 gathering them is a collective:
    # every rank takes part, rank 0 alone keeps and writes them.
    reshard_fsdp(run.model)
    weights = full_trainable_state(run.model, keep=run.rank == 0)
    optim = None if run.cfg.save_only_model else optimizer_state(run.model, run.optimizer, keep=run.rank == 0)
    if all_reduce_sums([failed], run.device)[0]:  # a rank could not write its RNG state
        failed = True
    elif run.rank == 0:
        failed = not publish_checkpoint(run, tmp, final, (weights, optim), best)
    if all_reduce_sums([failed], run.device)[0]:
        if run.rank == 0:
            remove(tmp)
        raise SystemExit(1)  # the message is printed; no traceback
    return final


def disk_full(error, path):
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or (torch.save reports a short
    write as a RuntimeError without errno) no space left where it wrote."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 1 << 20
    except OSError:
        return False


def failed_write(error, path):
    """'writing PATH failed: the disk is full' (or the error itself when it is something else)."""
    why = "the disk is full" if disk_full(error, path) else f"{type(error).__name__}: {error}"
    return f"writing {path} failed: {why}"


def last_checkpoint(output_dir):
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else "none yet"


def written(write, path, final, output_dir):
    """Runs write() for a checkpoint file at `path`; on a failure (disk full, quota, permissions)
    prints what failed and the checkpoint that is still whole, and returns False."""
    try:
        write()
        return True
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: RuntimeError; safetensors: its own
        print(f"\nsaving checkpoint {final} failed: {failed_write(e, path)}. The last complete checkpoint, "  # below a progress bar
              f"{last_checkpoint(output_dir)}, is intact: free space, then continue with --resume auto.",
              file=sys.stderr, flush=True)
        return False


def write_checkpoint_files(directory, model, gathered, state, cfg, classes):
    """gathered: (weights, optimizer state) as whole CPU tensors keyed by name; no optimizer.pt when
    the latter is None (save_only_model: state then says weights_only)."""
    weights, optim = gathered
    save_weights(model, directory, weights)
    if optim is not None:
        torch.save(optim, os.path.join(directory, OPTIMIZER_FILE))
    write_config(cfg, os.path.join(directory, CONFIG_FILE))
    with open(os.path.join(directory, CLASSES_FILE), "w") as f:
        json.dump(classes, f)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({**state, "base_model": base_model_fingerprint(cfg)}, f)


def publish_checkpoint(run, tmp, final, gathered, best):
    """Rank 0: write the files into `tmp`, rename it to `final`, move `best`, prune old ones.
    Returns False (and says why) when the disk refused, leaving the previous checkpoints as they were."""
    state = {**run.state, "weights_only": True} if run.cfg.save_only_model else run.state
    if not written(lambda: (write_checkpoint_files(tmp, run.model, gathered, state, run.cfg, run.classes),
                            publish(tmp, final)), tmp, final, run.cfg.output_dir):
        remove(tmp)  # keep what we had
        return False
    root = os.path.dirname(final)
    if best:  # a symlink replaced atomically; rotation never removes its target
        link = os.path.join(root, "best")
        write_atomically(link, lambda tmp_link: os.symlink(os.path.basename(final), tmp_link))
    rotate(run.cfg.output_dir, run.cfg.save_total_limit)
    return True


def rotate(output_dir, limit):
    """Keeps the newest `limit` step_* folders (0: all) and whatever checkpoints/best points at."""
    keep = os.path.realpath(os.path.join(output_dir, "checkpoints", "best"))
    for old in checkpoint_dirs(output_dir)[:-limit] if limit else []:
        if os.path.realpath(old) != keep:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Resuming

def resume_dir(cfg):
    """The checkpoint to resume from, or None. `--resume auto`: the newest one that can be read; one
    that cannot (a disk fault after its rename, a file deleted by hand) is named and passed over.
    One that can be read but does not fit this model/config stays an error (load_checkpoint)."""
    for tmp in glob.glob(os.path.join(cfg.output_dir, "checkpoints", ".step_*.tmp")):
        remove(tmp)  # left by a kill during a save; never complete
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    found, problems = checkpoint_dirs(cfg.output_dir), []
    for directory in reversed(found):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        problems.append(f"{directory}: {problem}")
        print0(f"--resume auto: {directory} cannot be read ({problem}); trying the one before it")
    if found:
        raise CheckpointError(f"--resume auto: no checkpoint in {cfg.output_dir}/checkpoints can be read:\n  "
                              + "\n  ".join(problems) + "\nMove them away to start afresh, or pass --resume DIR.")
    return None


def refuse_weights_only(directory, state):
    """A save_only_model checkpoint has no optimizer, schedule or RNG state: resuming from it would
    restart Adam from zero mid-schedule and draw other dropout masks, a run that silently differs
    from the one asked for. Refused; its weights serve --eval_only, predict.py and export.py."""
    if state.get("weights_only"):
        raise CheckpointError(f"{directory} was saved with save_only_model: true: it holds the weights but no "
                              f"optimizer, schedule or RNG state, so training cannot resume from it. Use it with "
                              f"--eval_only, predict.py or export.py; to resume runs, train with "
                              f"save_only_model: false.")


def load_training_state(directory, model, optimizer, scheduler, step, rank):
    """A resume, part 2, once the optimizer holds the (wrapped or sharded) model's parameters.
    Adam's moments come from the checkpoint; learning rates, decay and the schedule from this
    config (identical when it is unchanged, so resume stays exact; applied when it is changed)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_optimizer_state(os.path.join(directory, OPTIMIZER_FILE), model, optimizer)
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

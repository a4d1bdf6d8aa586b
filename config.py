"""The experiment's schema: one typed `Config` (a comment on every key), the allowed values, the
checks that span several keys, and YAML + `--key value` parsing. Everything else imports it from here.

    raw, where = read_command_line(["--config", "configs/ucf101.yaml", "--learning_rate", "5e-5"])
    cfg = validated_config(raw, where)

Key names follow LLaMA-Factory where the concept is the same. An unknown key is an error that names a
close valid key when there is one, every value is type-checked, and all problems are reported
together (ConfigError). The scripts parse through llamafactory.parse_config, which first translates
a LLaMA-Factory / IVCP YAML's other keys.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field

import yaml

from video import VideoSettings

# decoder.ActionDecoder's head types, named here so that parsing a config imports no torch
# (tests/test_layout.py checks the two lists are the same).
DECODER_TYPES = ("linear", "mlp", "transformer", "transformer_no_vision")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it and says what to do."""


@dataclass
class Config:
    # model
    model_name_or_path: str = "data/tiny-qwen2.5-vl"  # a Qwen-VL checkpoint folder or hub name (any family)
    trust_remote_code: bool = False  # passed to from_pretrained (the Qwen-VL families need none)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    num_action_classes: int = 6  # classes of the "default" label space
    multi_label: bool = False  # the default space is multi-label: action_label a list of classes, BCE, mAP
    # extra heads: {name: num_classes}, or {name: {num_classes: N, multi_label: true}} for a multi-label one
    label_spaces: dict = field(default_factory=dict)
    action_decoder_type: str = "linear"  # linear | mlp | transformer | transformer_no_vision
    action_decoder_hidden_size: int | None = None  # mlp / transformer's MLP inner size (default: the model's hidden size)
    action_decoder_num_transformer_layers: int = 2  # transformer heads: layers over [<ACT>, video tokens]
    action_decoder_num_heads: int = 8  # transformer heads: attention heads (must divide the model's hidden size)
    action_decoder_dropout: float = 0.1  # transformer heads: dropout in training (off in evaluation)
    action_cls_token_loss_weight: float = 0.0  # > 0: loss = CE + this x LM loss on the answer tokens (IVCP: 0.1)
    action_decoder_path: str | None = None  # initialise the head from ActionDecoder.save_pretrained output
    action_token_lr_scale: float = 0.1  # <ACT> row learning rate = learning_rate * this
    head_lr_scale: float = 1.0  # head learning rate = learning_rate * this
    # loss (HF Trainer's name where it has one)
    label_smoothing_factor: float = 0.0  # HF's: CE targets (1 - x) one-hot + x / C; BCE targets y (1 - x) + x / 2
    # None: unweighted. "balanced": from the training set's counts (sklearn's class_weight="balanced":
    # N / (C x count_c), a class absent from training gets 1; multi-label: each class's positives weighed
    # by its negatives / positives, BCE's pos_weight); or per class: a list of C weights (the default
    # space), or {label_space: "balanced" | [C weights]}. CE weights are normalised as torch's weight=.
    class_weights: str | list | dict | None = None
    # finetuning
    finetuning_type: str = "lora"  # lora | full | freeze
    lora_rank: int = 16  # adapter rank r
    lora_alpha: float = 32.0  # adapters scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target: str = "all"  # "all" Linear layers, or names: "q_proj,v_proj"
    use_dora: bool = False  # DoRA: weight-decomposed adapters (peft)
    use_rslora: bool = False  # rank-stabilised LoRA: adapters scaled by lora_alpha / sqrt(rank), not / rank
    freeze_vision_tower: bool = True  # false: adapters (lora) or full training on the vision blocks too
    freeze_multi_modal_projector: bool = True  # false: the same for the merger
    additional_target: str | None = None  # modules trained fully besides adapters, e.g. "visual.patch_embed"
    # data
    # [{path, video_root, weight, label_space, name, frame_fps}]; frame_fps: the frame rate of the entry's
    # frame-folder videos (a record's own `fps` wins; a video file's rate is its own)
    train_datasets: list = field(default_factory=list)
    eval_datasets: list = field(default_factory=list)  # the same form; evaluated every eval_steps and at the end
    video_fps: float = 2.0  # frames sampled per second of video (LLaMA-Factory's default) ...
    video_maxlen: int = 128  # ... up to this many frames
    video_num_frames: int | None = None  # a fixed frame count instead of fps/maxlen
    video_max_pixels: int = 256 * 256  # per-frame budget after resizing (sides: multiples of 28; 32 on Qwen3-VL/3.5)
    video_min_pixels: int = 16 * 16  # smaller frames are scaled up to this
    video_cache_dir: str | None = None  # opt-in cache of decoded, resized frames (see video.cached_clip)
    dataloader_num_workers: int = 0  # processes decoding videos (0: in the training process)
    max_bad_video_fraction: float = 0.01  # unreadable videos are skipped and counted; more than this fails
    group_by_length: bool = False  # batch clips of similar token counts together (less padding)
    # optimisation
    per_device_train_batch_size: int = 8  # clips per micro-batch on each rank
    per_device_eval_batch_size: int = 8  # clips per evaluation batch on each rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-4  # peak learning rate of the adapters / trained layers
    weight_decay: float = 0.0  # AdamW decay (never on biases, norms or the <ACT> row)
    adam_beta1: float = 0.9  # AdamW betas
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    num_train_epochs: float = 1.0  # epochs (fractions allowed) when max_steps is not set
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant | polynomial
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # polynomial: {power: 1.0, lr_end: 1e-7}
    warmup_ratio: float = 0.0  # linear warm-up over this fraction of the steps
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    bf16: bool = False  # frozen weights in bf16 and bf16 autocast; what trains stays fp32
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # FSDP2 instead of DDP: parameters, gradients and Adam state sharded over the ranks
    seed: int = 42  # data order, frame offsets, held-out split, head initialisation
    # run directory
    output_dir: str = "runs/default"  # config.yaml, metrics.jsonl, TensorBoard events, checkpoints/
    logging_steps: int = 10  # a train line every this many optimizer steps
    eval_steps: int = 0  # 0: evaluate at the end only
    save_steps: int = 0  # 0: save at the end only
    save_total_limit: int = 2  # step_* folders kept (0: all); checkpoints/best is always kept
    resume: str | None = None  # "auto" (newest complete checkpoint in output_dir) or a checkpoint dir
    overwrite_output_dir: bool = False  # a fresh run in a folder another run trained in: delete that run first
    save_only_model: bool = False  # checkpoints without optimizer/RNG state: smaller, but a resume refuses them
    metric_for_best_model: str = "top1"  # picks checkpoints/best: top1 | top5 | mean_class_acc | mAP | loss (eval_ ok)
    report_to: str | list = "tensorboard"  # none | tensorboard | wandb, or a list of them
    run_name: str | None = None  # the wandb run's name (default: output_dir's folder name)
    ddp_timeout: int = 1800  # seconds a collective (or the rendezvous) may wait for the other ranks
    max_samples: int | None = None  # the first N records of each training dataset
    val_size: float = 0.0  # hold out this fraction (0 < x < 1) or count (int >= 1) of each training set for eval
    # evaluation
    eval_num_clips: int = 1  # temporal views per video (frame offsets shifted inside each segment)
    eval_num_crops: int = 1  # spatial views: 1 (whole frame) or 3 (start/centre/end squares)
    eval_only: bool = False  # evaluate `checkpoint` on eval_datasets, write eval.json, predictions.jsonl
    checkpoint: str | None = None  # the checkpoint folder eval_only evaluates




# The allowed values, beyond the types above.
CHOICES = {"finetuning_type": ("lora", "full", "freeze"), "eval_num_crops": (1, 3),
           "action_decoder_type": DECODER_TYPES,
           "lr_scheduler_type": ("cosine", "linear", "constant", "polynomial"),
           "attn_implementation": ("sdpa", "eager", "flash_attention_2")}
POSITIVE = ("num_action_classes", "lora_rank", "video_fps", "video_maxlen", "video_max_pixels",
            "video_min_pixels", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "logging_steps", "eval_num_clips",
            "action_decoder_num_transformer_layers", "action_decoder_num_heads", "ddp_timeout", "max_samples")
NON_NEGATIVE = ("max_bad_video_fraction", "weight_decay", "lora_dropout", "max_grad_norm", "warmup_ratio", "warmup_steps",
                "dataloader_num_workers", "eval_steps", "save_steps", "save_total_limit", "action_token_lr_scale",
                "head_lr_scale", "action_decoder_dropout", "action_cls_token_loss_weight", "val_size")
DATASET_KEYS = {"path", "video_root", "weight", "label_space", "name", "columns", "tags", "frame_fps"}
REPORT_TARGETS = ("none", "tensorboard", "wandb")
# metric_for_best_model: the eval metric -> whether higher is better. LLaMA-Factory / HF Trainer
# spell them with an `eval_` prefix, and call top-1 `accuracy`.
BEST_METRICS = {"top1": True, "top5": True, "mean_class_acc": True, "loss": False, "mAP": True}
METRIC_ALIASES = {"accuracy": "top1", "acc": "top1"}
SCHEDULER_KWARGS = {"polynomial": {"power", "lr_end"}}  # HF's get_polynomial_decay_schedule_with_warmup


def type_ok(value, annotation):
    if annotation is typing.Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
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
    kwargs = raw.get("lr_scheduler_kwargs")
    if isinstance(kwargs, dict):  # {lr_end: 1e-7}: the same YAML quirk one level down
        raw["lr_scheduler_kwargs"] = {k: float_or_same(v) for k, v in kwargs.items()}
    return raw


def float_or_same(value):
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def config_problems(raw, also_known=()):
    """Every problem with a raw {key: value} config, so they can be reported together. `also_known`:
    keys handled before the schema (LLaMA-Factory's), offered too when a key looks like a typo."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    problems = []
    for key, value in raw.items():
        if key not in fields:  # a near miss of a key or of a LLaMA-Factory key; no far-fetched guesses
            close = difflib.get_close_matches(key, [*fields, *also_known], n=1, cutoff=0.75)
            problems.append(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        elif not type_ok(value, hints[key]):
            problems.append(f"{key}: expected {getattr(hints[key], '__name__', hints[key])}, got {value!r}")
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of {CHOICES[key]}")
        elif key in POSITIVE and value is not None and value <= 0:
            problems.append(f"{key}: must be > 0, got {value!r}")
        elif key in NON_NEGATIVE and value < 0:
            problems.append(f"{key}: must be >= 0, got {value!r}")
        elif key == "action_decoder_dropout" and value >= 1:
            problems.append(f"{key}: must be < 1 (a probability), got {value!r}")
    return problems + cross_key_problems(raw)


# ---------------------------------------------------------------------------------------------------
# Checks that span several keys, in one place

def cross_key_problems(raw):
    """The problems one type check cannot catch: dataset entries, the logging, split,
    best-checkpoint and schedule keys (values that depend on each other, names within a string)."""
    problems = []
    report = raw.get("report_to", "tensorboard")
    if isinstance(report, (str, list)):
        unknown = [t for t in report_targets(report) if t not in REPORT_TARGETS]
        if unknown:
            problems.append(f"report_to: {unknown} not among {REPORT_TARGETS} (a name, a comma list, or a YAML list)")
    metric = raw.get("metric_for_best_model", "top1")
    if isinstance(metric, str) and best_metric(metric) is None:
        problems.append(f"metric_for_best_model: {metric!r} is not an eval metric here; use one of "
                        f"{sorted(BEST_METRICS)} (an `eval_` prefix and `accuracy` for top1 are accepted)")
    val_size = raw.get("val_size", 0)
    if isinstance(val_size, float) and not isinstance(val_size, bool) and val_size >= 1:
        problems.append(f"val_size: {val_size} is neither a fraction in (0, 1) nor a whole count (write {int(val_size)})")
    if isinstance(val_size, (int, float)) and val_size > 0 and raw.get("eval_datasets"):
        problems.append("val_size holds part of the training set out as the eval set, and eval_datasets is also "
                        "set: use one of them (LLaMA-Factory refuses the pair too)")
    kwargs, scheduler = raw.get("lr_scheduler_kwargs") or {}, raw.get("lr_scheduler_type", "cosine")
    if isinstance(kwargs, dict) and kwargs:
        allowed = SCHEDULER_KWARGS.get(scheduler, set())
        if set(kwargs) - allowed:
            problems.append(f"lr_scheduler_kwargs: {sorted(set(kwargs) - allowed)} not understood by "
                            f"lr_scheduler_type {scheduler!r}" + (f" (it takes {sorted(allowed)})" if allowed else
                                                                  " (only polynomial takes power, lr_end)"))
        elif not all(type_ok(v, float) for v in kwargs.values()):
            problems.append(f"lr_scheduler_kwargs: expected numbers, got {kwargs}")
        elif type_ok(lr := raw.get("learning_rate", Config.learning_rate), float) and kwargs.get("lr_end", 0) >= lr:
            problems.append(f"lr_scheduler_kwargs: lr_end {kwargs['lr_end']} must be below learning_rate {lr}")
    return problems + dataset_entry_problems(raw) + loss_problems(raw)


def report_targets(report_to):
    """report_to as a list of names: "wandb", "tensorboard,wandb" or [tensorboard, wandb]; "none" -> []."""
    names = report_to if isinstance(report_to, list) else report_to.split(",")
    return [str(n).strip() for n in names if str(n).strip() not in ("", "none")]


def best_metric(name):
    """metric_for_best_model -> (eval metric key, higher is better), or None when it is not one."""
    key = name[len("eval_"):] if name.startswith("eval_") else name
    key = METRIC_ALIASES.get(key, key)
    return (key, BEST_METRICS[key]) if key in BEST_METRICS else None


def dataset_entry_problems(raw):
    problems = label_space_problems(raw.get("label_spaces"))
    for key in ("train_datasets", "eval_datasets"):
        for i, entry in enumerate(raw.get(key) or []):
            if not isinstance(entry, dict) or "path" not in entry:
                problems.append(f"{key}[{i}]: expected {{path, video_root, weight, label_space, name}}, got {entry!r}")
            elif set(entry) - DATASET_KEYS:
                problems.append(f"{key}[{i}]: unknown key(s) {sorted(set(entry) - DATASET_KEYS)}; "
                                f"allowed: {sorted(DATASET_KEYS)}")
            elif entry.get("frame_fps") is not None and not (type_ok(entry["frame_fps"], float) and entry["frame_fps"] > 0):
                problems.append(f"{key}[{i}]: frame_fps must be a positive number (the frame rate of its frame "
                                f"folders), got {entry['frame_fps']!r}")
    return problems


SPACE_KEYS = {"num_classes", "multi_label"}


def label_space_problems(spaces):
    """label_spaces: {name: num_classes} or {name: {num_classes: N, multi_label: bool}}."""
    problems = []
    for name, value in (spaces or {}).items() if isinstance(spaces, dict) else []:
        if isinstance(value, dict):
            if set(value) - SPACE_KEYS or "num_classes" not in value:
                problems.append(f"label_spaces.{name}: expected {{num_classes: N, multi_label: true|false}}, got {value!r}")
                continue
            if not isinstance(value.get("multi_label", False), bool):
                problems.append(f"label_spaces.{name}.multi_label: expected true or false, got {value['multi_label']!r}")
            value = value["num_classes"]
        if not type_ok(value, int) or value <= 0:
            problems.append(f"label_spaces.{name}: the class count must be a whole number > 0, got {value!r}")
    return problems


def loss_problems(raw):
    """label_smoothing_factor in [0, 1); class_weights "balanced", C positive weights for the default
    space, or {label_space: either} for declared spaces of the right sizes."""
    problems = []
    smoothing = raw.get("label_smoothing_factor", 0.0)
    if type_ok(smoothing, float) and not 0 <= smoothing < 1:
        problems.append(f"label_smoothing_factor: must be in [0, 1), got {smoothing!r}")
    weights = raw.get("class_weights")
    if weights is None or label_space_problems(raw.get("label_spaces")):
        return problems
    sizes = {"default": raw.get("num_action_classes", Config.num_action_classes),
             **{k: v["num_classes"] if isinstance(v, dict) else v for k, v in (raw.get("label_spaces") or {}).items()}}
    by_space = weights if isinstance(weights, dict) else {"default": weights}
    for space, w in by_space.items():
        where = f"class_weights.{space}" if isinstance(weights, dict) else "class_weights"
        if space not in sizes:
            problems.append(f"{where}: no label space {space!r} (declared: {sorted(sizes)})")
        elif w != "balanced" and not (isinstance(w, list) and all(type_ok(x, float) and x > 0 for x in w)):
            problems.append(f"{where}: expected \"balanced\" or a list of {sizes[space]} positive weights, got {w!r}")
        elif isinstance(w, list) and len(w) != sizes[space]:
            problems.append(f"{where}: {len(w)} weights for the {sizes[space]} classes of label space {space!r}")
    return problems


def task_problems(raw):
    """What a command needs besides valid keys: data to train on, or a checkpoint to evaluate."""
    if not raw.get("eval_only") and not raw.get("train_datasets"):
        return ["train_datasets: at least one dataset is needed"]
    if raw.get("eval_only") and not (raw.get("checkpoint") and raw.get("eval_datasets")):
        return ["eval_only needs --checkpoint DIR and eval_datasets"]
    return []


def read_yaml(path):
    """A YAML file's mapping of config keys. A missing file or a syntax error is a ConfigError that
    names the file and line, not a parser traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        what = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part)
        raise ConfigError(f"{where}: YAML syntax error: {what or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(raw).__name__}")
    return raw


def read_command_line(argv, description=None):
    """`--config FILE` and `--key value` overrides (the value parsed as YAML: "[a, b]" is a list; a
    bare `--flag` is true) -> (raw {key: value}, where: the file or "command line")."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the experiment's keys")
    args, rest = parser.parse_known_args(argv)
    raw = read_yaml(args.config) if args.config is not None else {}
    while rest:
        key = rest.pop(0)
        if not key.startswith("--"):
            raise ConfigError(f"overrides must be `--key value` pairs; {key!r} has no key before it")
        try:
            raw[key[2:]] = yaml.safe_load(rest.pop(0)) if rest and not rest[0].startswith("--") else True
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: its value is not valid YAML ({e})") from None
    return raw, args.config if args.config is not None else "command line"


def validated_config(raw, where, problems=(), also_known=()):
    """raw {key: value} -> Config, or one ConfigError listing `problems` (found before, e.g. by the
    LLaMA-Factory translation) and every problem of the keys and values."""
    problems = [*problems, *config_problems(coerce_floats(raw), also_known)]
    if not problems:
        problems = task_problems(raw)
    if problems:
        raise ConfigError(f"config error(s) in {where}:\n  " + "\n  ".join(problems))
    return Config(**raw)


def saved_config(path):
    """The Config a run wrote (output_dir/config.yaml, a checkpoint's config.yaml)."""
    raw = read_yaml(path)
    problems = config_problems(coerce_floats(raw))
    if problems:
        raise ConfigError(f"{path} does not fit this version's config:\n  " + "\n  ".join(problems))
    return Config(**raw)


def changed_keys(old, new, ignore=("resume", "overwrite_output_dir", "output_dir")):
    """[(key, old value, new value)] for every key whose value differs, in the schema's order."""
    return [(f.name, getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(Config)
            if f.name not in ignore and getattr(old, f.name) != getattr(new, f.name)]


def head_sizes(cfg):
    """{label_space: num_classes}: "default" (num_action_classes) plus label_spaces; every dataset's
    label_space must be one of them."""
    sizes = {"default": cfg.num_action_classes,
             **{name: v["num_classes"] if isinstance(v, dict) else v for name, v in cfg.label_spaces.items()}}
    for key in ("train_datasets", "eval_datasets"):
        for entry in getattr(cfg, key):
            space = entry.get("label_space", "default")
            if space not in sizes:
                raise ConfigError(f"{key}: label_space {space!r} of {entry['path']} is not declared; "
                                  f"add it to label_spaces: {{{space}: NUM_CLASSES}}")
    return sizes


def multi_label_spaces(cfg):
    """The label spaces declared multi-label (`multi_label: true`, label_spaces' {multi_label: true})."""
    spaces = {name for name, v in cfg.label_spaces.items() if isinstance(v, dict) and v.get("multi_label", False)}
    return frozenset(spaces | ({"default"} if cfg.multi_label else set()))


def class_weight_setting(cfg, space):
    """class_weights for one label space: None, "balanced" or a list of weights ("balanced" alone is
    for every space, a list for the default space, a mapping per space)."""
    weights = cfg.class_weights
    if isinstance(weights, dict):
        return weights.get(space)
    if isinstance(weights, list):
        return weights if space == "default" else None
    return weights


def video_settings(cfg, geometry):
    """geometry: the model family's {resize_factor, temporal_patch_size} (model.vision_geometry)."""
    return VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                         cfg.video_max_pixels, cfg.video_cache_dir, **geometry)


def write_config(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


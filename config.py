"""The experiment's schema: one typed `Config`, its allowed values, and YAML + `--key value` parsing.

    cfg = parse_config(["--config", "configs/ucf101.yaml", "--learning_rate", "5e-5"])

Key names follow LLaMA-Factory where the concept is the same. An unknown key is an error that names
the closest valid key, every value is type-checked, and all problems are reported together
(ConfigError). Everyone imports the schema from here.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field

import yaml

from decoder import DECODER_TYPES
from video import VideoSettings


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it and says what to do."""


@dataclass
class Config:
    # model
    model_name_or_path: str = "data/tiny-qwen2.5-vl"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    num_action_classes: int = 6  # classes of the "default" label space
    label_spaces: dict = field(default_factory=dict)  # extra heads: {name: num_classes}
    action_decoder_type: str = "linear"  # linear | mlp | transformer | transformer_no_vision
    action_decoder_hidden_size: int | None = None  # mlp / transformer's MLP inner size (default: the model's hidden size)
    action_decoder_num_transformer_layers: int = 2  # transformer heads: layers over [<ACT>, video tokens]
    action_decoder_num_heads: int = 8  # transformer heads: attention heads (must divide the model's hidden size)
    action_decoder_dropout: float = 0.1  # transformer heads: dropout in training (off in evaluation)
    action_cls_token_loss_weight: float = 0.0  # > 0: loss = CE + this x LM loss on the answer tokens (IVCP: 0.1)
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
    train_datasets: list = field(default_factory=list)  # [{path, video_root, weight, label_space, name}]
    eval_datasets: list = field(default_factory=list)
    video_fps: float = 2.0  # frames sampled per second of video (LLaMA-Factory's default) ...
    video_maxlen: int = 128  # ... up to this many frames
    video_num_frames: int | None = None  # a fixed frame count instead of fps/maxlen
    video_max_pixels: int = 256 * 256  # per-frame pixel budget after resizing (sides multiples of 28)
    video_min_pixels: int = 16 * 16
    video_cache_dir: str | None = None  # opt-in cache of decoded, resized frames (see video.cached_clip)
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


# The allowed values, beyond the types above.
CHOICES = {"finetuning_type": ("lora", "full", "freeze"), "eval_num_crops": (1, 3),
           "action_decoder_type": DECODER_TYPES, "lr_scheduler_type": ("cosine", "linear", "constant"),
           "attn_implementation": ("sdpa", "eager", "flash_attention_2")}
POSITIVE = ("num_action_classes", "lora_rank", "video_fps", "video_maxlen", "video_max_pixels",
            "video_min_pixels", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "logging_steps", "eval_num_clips",
            "action_decoder_num_transformer_layers", "action_decoder_num_heads")
NON_NEGATIVE = ("max_bad_video_fraction", "weight_decay", "lora_dropout", "max_grad_norm", "warmup_ratio", "warmup_steps",
                "dataloader_num_workers", "eval_steps", "save_steps", "save_total_limit", "action_token_lr_scale",
                "head_lr_scale", "action_decoder_dropout", "action_cls_token_loss_weight")
DATASET_KEYS = {"path", "video_root", "weight", "label_space", "name"}


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
        elif key == "action_decoder_dropout" and value >= 1:
            problems.append(f"{key}: must be < 1 (a probability), got {value!r}")
    for key in ("train_datasets", "eval_datasets"):
        for i, entry in enumerate(raw.get(key) or []):
            if not isinstance(entry, dict) or "path" not in entry:
                problems.append(f"{key}[{i}]: expected {{path, video_root, weight, label_space, name}}, got {entry!r}")
            elif set(entry) - DATASET_KEYS:
                problems.append(f"{key}[{i}]: unknown key(s) {sorted(set(entry) - DATASET_KEYS)}; "
                                f"allowed: {sorted(DATASET_KEYS)}")
    return problems


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


def parse_config(argv, description=None):
    """`--config FILE` and `--key value` overrides (the value parsed as YAML: "[a, b]" is a list; a
    bare `--flag` is true) -> a validated Config."""
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
    problems = config_problems(coerce_floats(raw))
    if not problems and not raw.get("eval_only") and not raw.get("train_datasets"):
        problems.append("train_datasets: at least one dataset is needed")
    if not problems and raw.get("eval_only") and not (raw.get("checkpoint") and raw.get("eval_datasets")):
        problems.append("eval_only needs --checkpoint DIR and eval_datasets")
    if problems:
        where = args.config if args.config is not None else "command line"
        raise ConfigError(f"config error(s) in {where}:\n  " + "\n  ".join(problems))
    return Config(**raw)


def saved_config(path):
    """The Config a run wrote (output_dir/config.yaml, a checkpoint's config.yaml)."""
    raw = read_yaml(path)
    problems = config_problems(coerce_floats(raw))
    if problems:
        raise ConfigError(f"{path} does not fit this version's config:\n  " + "\n  ".join(problems))
    return Config(**raw)


def head_sizes(cfg):
    """{label_space: num_classes}: "default" (num_action_classes) plus label_spaces; every dataset's
    label_space must be one of them."""
    sizes = {"default": cfg.num_action_classes, **cfg.label_spaces}
    for key in ("train_datasets", "eval_datasets"):
        for entry in getattr(cfg, key):
            space = entry.get("label_space", "default")
            if space not in sizes:
                raise ConfigError(f"{key}: label_space {space!r} of {entry['path']} is not declared; "
                                  f"add it to label_spaces: {{{space}: NUM_CLASSES}}")
    return sizes


def video_settings(cfg):
    return VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                         cfg.video_max_pixels, cfg.video_cache_dir)


def write_config(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


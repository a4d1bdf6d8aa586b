"""LLaMA-Factory / IVCP setups, as they are: a user's YAML, dataset registry and folders, translated
into actcls's Config (config.py, the schema) with every decision said once at start-up.

    cfg = parse_config(["--config", "qwen2_5vl_ucf101.yaml", "--dataset_dir", "data"], notes=notes)

Each key of such a YAML that is not a Config field is translated (same meaning, another name or
form), ignored with a reason (no meaning here), or refused with what to do instead; never silently
dropped. Datasets named in `dataset_info.json` become train_datasets/eval_datasets entries, videos
under `media_dir`; a registry's own column and tag names are mapped back by `renamed_record`. IVCP's
head folders (action_decoder.safetensors with head.* keys) and peft adapter folders are recognised
and either used or refused with the reason. `lf_key_kind(key)` says how any key is handled.
"""

import dataclasses
import importlib.util
import json
import math
import os

import torch
from safetensors import safe_open

from checkpoint import folder_kind
from config import Config, ConfigError, read_command_line, read_yaml, validated_config
from decoder import ivcp_decoder_type

# No meaning here: accepted with any value, listed once at start-up with the reason.
IGNORED = {
    "template": "the chat template comes from the model's own processor (model_name_or_path)",
    "preprocessing_num_workers": "records are read and checked up front; frames are decoded by dataloader_num_workers",
    "preprocessing_batch_size": "nothing is pre-tokenised; samples are built on the fly",
    "overwrite_cache": "nothing is pre-tokenised to a cache",
    "tokenized_path": "nothing is pre-tokenised to disk",
    "plot_loss": "the loss curve is in output_dir/metrics.jsonl and TensorBoard",
    "enable_liger_kernel": "Liger's fused kernels speed up lm_head + loss, and lm_head never runs here",
    "image_max_pixels": "records hold videos, not images (video_max_pixels applies)",
    "image_min_pixels": "records hold videos, not images (video_min_pixels applies)",
    "load_best_model_at_end": "checkpoints/best keeps the best evaluated step (a symlink); evaluate, predict or "
                              "export that folder; the final weights are not swapped for it",
    "logging_dir": "TensorBoard events go to output_dir",
    "ddp_find_unused_parameters": "every trainable parameter gets a gradient each step; DDP is set up accordingly",
    "dataloader_pin_memory": "the loaders choose pinning themselves",
    "print_param_status": "train.py prints the trainable parameter count at start-up",
    "resize_vocab": "<ACT> fits Qwen's spare embedding rows; the table is resized only when it does not",
    "tf32": "matmul precision is PyTorch's default here",
}

# Features not built here: a key may stay at the value that switches it off (listed as ignored);
# any other value is an error that says what to use instead.
REFUSED = {
    "fp16": ((False, None), "fp16 (loss scaling) is not built; use bf16: true"),
    "deepspeed": ((None,), "DeepSpeed is not used: DDP by default, fsdp: true (PyTorch FSDP2) for models that "
                           "do not fit one GPU"),
    "quantization_bit": ((None,), "quantised base weights (QLoRA) are not built; bf16: true halves the base model"),
    "packing": ((False, None), "each sample is one video with one <ACT>; samples are not packed"),
    "neat_packing": ((False, None), "each sample is one video with one <ACT>; samples are not packed"),
    "streaming": ((False, None), "datasets are read and checked up front, not streamed"),
    "use_unsloth": ((False, None), "Unsloth is not used"),
    "use_galore": ((False, None), "GaLore is not built; the optimizer is AdamW"),
    "use_apollo": ((False, None), "APOLLO is not built; the optimizer is AdamW"),
    "use_badam": ((False, None), "BAdam is not built; the optimizer is AdamW"),
    "pissa_init": ((False, None), "PiSSA initialisation is not built; adapters start as peft's default"),
    "loraplus_lr_ratio": ((None,), "LoRA+ is not built; head_lr_scale and action_token_lr_scale set the other "
                                   "groups' rates"),
    "use_llama_pro": ((False, None), "LLaMA Pro block expansion is not built"),
    "predict_with_generate": ((False, None), "predictions are class probabilities (predictions.jsonl), not text"),
    "push_to_hub": ((False, None), "nothing is pushed; export.py writes a self-contained folder to upload"),
    "optim": (("adamw_torch", "adamw_torch_fused", "adamw_hf"), "the optimizer is torch AdamW (named groups)"),
    "adam_epsilon": ((1e-8, "1e-8"), "AdamW's eps is PyTorch's 1e-8 (also LLaMA-Factory's default)"),
    "mix_strategy": (("concat",), "datasets mix by each train_datasets entry's `weight`"),
    "save_strategy": (("steps",), "checkpoints are written every save_steps (0: at the end only)"),
    "logging_strategy": (("steps",), "the loss is logged every logging_steps"),
}

# A YAML names datasets in LLaMA-Factory's registry; its sharegpt defaults, when an entry names no columns/tags.
SHAREGPT_COLUMNS = {"messages": "conversations", "videos": "videos"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
# actcls's own record format: an entry in it needs no `columns`/`tags`.
NATIVE_COLUMNS = {"messages": "messages", "videos": "videos", "action_label": "action_label"}
NATIVE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
REGISTRY_FIELDS = {"file_name", "formatting", "columns", "tags", "split"}

# The keys that shape a checkpoint's model: an evaluation of it (do_eval/do_predict) takes them from the
# checkpoint's config.yaml, as peft takes LoRA settings from an adapter's adapter_config.json.
MODEL_SHAPE_KEYS = ("finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
                    "use_rslora", "freeze_vision_tower", "freeze_multi_modal_projector", "additional_target",
                    "num_action_classes", "label_spaces", "action_decoder_type", "action_decoder_hidden_size",
                    "action_decoder_num_transformer_layers", "action_decoder_num_heads", "action_decoder_dropout")

IVCP_TRANSFORMER_HEAD = (
    "action_decoder_path {path}: IVCP's transformer head (action_decoder.safetensors with projection.*, "
    "transformer_layers.*, final_norm.* keys and no action_decoder.json). actcls's transformer head has the same "
    "layers, but IVCP trained them on the vision tower's outputs from a second vision pass, while actcls feeds "
    "them the video tokens' last-layer states from the <ACT> forward, and the file does not record its head "
    "count or dropout: its weights would compute something else here. Set action_decoder_path: null to train "
    "the head afresh")

# Upper bound of a sample's length for cutoff_len: video tokens at the smallest patch size (14 px, merged
# 2x2: one token per 28x28 pixels, two frames per token), plus the prompt's text.
PIXELS_PER_TOKEN = 28 * 28
TEXT_TOKENS = 128


def is_bool(value):
    return isinstance(value, bool)


def shown(value):
    """A value as the YAML said it: true, false, null."""
    return json.dumps(value) if isinstance(value, bool) or value is None else value


def flash_attn_available():
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def attention_key(raw, notes, problems):
    """flash_attn (auto | disabled | sdpa | fa2) -> attn_implementation; fa2 without flash-attn falls
    back to SDPA with a warning, as LLaMA-Factory does."""
    value = raw.pop("flash_attn")
    if "attn_implementation" in raw:
        problems.append("flash_attn and attn_implementation both set: keep one")
        return
    names = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}
    if value not in names:
        problems.append(f"flash_attn: {value!r} is not one of {tuple(names)}")
        return
    raw["attn_implementation"] = names[value]
    if value == "fa2" and not flash_attn_available():
        raw["attn_implementation"] = "sdpa"
        notes.append(("warning", "flash_attn", "fa2 -> attn_implementation: sdpa (FlashAttention-2 needs the "
                      "flash-attn package and a CUDA GPU, not found here; pip install flash-attn to use it)"))
    else:
        notes.append(("translated", "flash_attn", f"{value} -> attn_implementation: {raw['attn_implementation']}"))


def resume_key(raw, notes, problems):
    """resume_from_checkpoint: a checkpoint folder, or true (the newest in output_dir) -> resume."""
    value = raw.pop("resume_from_checkpoint")
    if value is None or value is False:
        return notes.append(("ignored", "resume_from_checkpoint", f"{shown(value)}: a fresh start, as without it"))
    if "resume" in raw:
        return problems.append("resume_from_checkpoint and resume both set: keep one")
    raw["resume"] = "auto" if value is True else value
    notes.append(("translated", "resume_from_checkpoint", f"{shown(value)} -> resume: {raw['resume']}"))


def stage_key(raw, notes, problems):
    value = raw.pop("stage")
    if value != "action_cls":
        return problems.append(f"stage: {value!r}: actcls trains only IVCP's action_cls stage (an <ACT> token and "
                               f"a classification head); use LLaMA-Factory for {value}")
    notes.append(("ignored", "stage", "action_cls: the only stage there is here"))


def task_keys(raw, notes, problems):
    """do_train / do_eval / do_predict + adapter_name_or_path: training, or (do_train: false) the
    evaluation of an actcls checkpoint with eval_only (eval.json and predictions.jsonl)."""
    flags = {key: raw.pop(key) for key in ("do_train", "do_eval", "do_predict") if key in raw}
    adapter = raw.pop("adapter_name_or_path", None)
    for key, value in flags.items():
        if not is_bool(value):
            problems.append(f"{key}: expected true or false, got {value!r}")
            return
    do_train = flags.get("do_train", not (flags.get("do_eval") or flags.get("do_predict")))
    asks = [key for key in ("do_eval", "do_predict") if flags.get(key)]
    for key in [k for k in ("do_eval", "do_predict") if flags.get(k) is False]:
        notes.append(("ignored", key, "false: as without it (evaluation during training follows eval_dataset "
                      "and eval_steps)"))
    if do_train:
        if "do_train" in flags:
            notes.append(("ignored", "do_train", "true: train.py trains"))
        if flags.get("do_eval"):
            notes.append(("ignored", "do_eval", "true: evaluation runs every eval_steps and at the end when "
                          "eval_dataset is set"))
        if flags.get("do_predict"):
            problems.append("do_predict with do_train: predict after training, with do_train: false, do_predict: "
                            "true and adapter_name_or_path: OUTPUT_DIR/checkpoints/best")
        if adapter is not None:
            problems.append(f"adapter_name_or_path {adapter}: training on top of an existing adapter is not "
                            f"built; continue an actcls run with resume_from_checkpoint: CHECKPOINT_DIR (or true)")
        return
    if not asks:
        return problems.append("do_train: false with neither do_eval nor do_predict: nothing to do")
    for key in [k for k in ("do_train", *asks) if k in flags]:
        notes.append(("translated", key, f"{shown(flags[key])} -> eval_only: true"))
    if adapter is None:
        return problems.append(f"{asks[0]}: true needs adapter_name_or_path: an actcls checkpoint folder "
                               f"(OUTPUT_DIR/checkpoints/best or a step_* folder)")
    problem = checkpoint_folder_problem("adapter_name_or_path", adapter)
    if problem is not None:
        return problems.append(problem)
    raw["eval_only"], raw["checkpoint"] = True, adapter
    notes.append(("translated", "adapter_name_or_path", f"{adapter} -> checkpoint: {adapter}"))
    take_model_shape(raw, notes, adapter)
    if raw.get("action_decoder_path") is not None:
        notes.append(("ignored", "action_decoder_path", f"{raw.pop('action_decoder_path')}: the checkpoint "
                      f"holds its heads"))


def take_model_shape(raw, notes, checkpoint):
    """The checkpoint's model settings replace the YAML's (IVCP's eval YAMLs leave out the adapter's)."""
    saved = read_yaml(os.path.join(checkpoint, "config.yaml"))
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(Config)}
    changed = [f"{key}: {shown(raw.get(key, defaults.get(key)))} -> {shown(saved[key])}" for key in MODEL_SHAPE_KEYS
               if key in saved and raw.get(key, defaults.get(key)) != saved[key]]
    raw.update({key: saved[key] for key in MODEL_SHAPE_KEYS if key in saved})
    if changed:
        notes.append(("translated", "adapter_name_or_path", "the checkpoint's model settings: " + ", ".join(changed)))


def checkpoint_folder_problem(key, directory):
    """None for an actcls checkpoint folder; else what the folder is and what to point `key` at."""
    kind = folder_kind(directory)
    if kind == "checkpoint":
        return None
    if kind == "run":
        return f"{key} {directory}: a run folder; point it at one of its checkpoints, e.g. {directory}/checkpoints/best"
    if kind == "peft":
        return (f"{key} {directory}: a peft adapter as LLaMA-Factory/IVCP writes it (adapter_config.json, "
                f"adapter_model.safetensors), not an actcls checkpoint. It cannot be reused here: IVCP resizes the "
                f"embedding table to len(tokenizer) rounded up to 64 rows before training{embedding_rows(directory)} "
                f"and learns <ACT> inside that table, so its adapters and <ACT> row belong to that table; actcls "
                f"keeps the model's table and learns <ACT> as its own row. Train with actcls (this YAML with "
                f"do_train: true) and point {key} at OUTPUT_DIR/checkpoints/best")
    if kind == "missing":
        return f"{key} {directory}: no such folder; point it at an actcls checkpoint (OUTPUT_DIR/checkpoints/best)"
    return (f"{key} {directory}: not an actcls checkpoint folder (trainable.safetensors, config.yaml); point it at "
            f"OUTPUT_DIR/checkpoints/best or a step_* folder")


def embedding_rows(directory):
    """' (its embed_tokens has N rows)' when the adapter file saved the resized table, else ''."""
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return ""
    with safe_open(path, framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if "embed_tokens" in k and k.endswith("weight")]
    return f" (its embed_tokens has {rows[0]} rows)" if rows else ""


def decoder_path_key(raw, notes, problems):
    """An IVCP head folder: its linear/mlp weights load as the head; its transformer head cannot."""
    path = raw["action_decoder_path"]
    if not isinstance(path, str) or not os.path.isdir(path):
        return
    ivcp_type = ivcp_decoder_type(path)
    if ivcp_type == "transformer":
        problems.append(IVCP_TRANSFORMER_HEAD.format(path=path))
    elif ivcp_type is not None:
        notes.append(("translated", "action_decoder_path", f"{path}: IVCP's {ivcp_type} head (head.* keys, no "
                      f"action_decoder.json) loads as this head; its sizes come from its weights"))


def dataset_keys(raw, notes, problems):
    """dataset / eval_dataset (names, or comma lists) through dataset_dir/dataset_info.json ->
    train_datasets / eval_datasets, videos under media_dir (default: dataset_dir)."""
    given = {key: raw.pop(key) for key in ("dataset_dir", "media_dir") if key in raw}
    dataset_dir = given.get("dataset_dir", "data")
    media_dir = given.get("media_dir", dataset_dir)
    if "dataset" not in raw and "eval_dataset" not in raw:
        for key, value in given.items():
            notes.append(("ignored", key, f"{value}: read only for dataset / eval_dataset"))
        return
    for key, ours in (("dataset", "train_datasets"), ("eval_dataset", "eval_datasets")):
        if key not in raw:
            continue
        names = raw.pop(key)
        if ours in raw:
            problems.append(f"{key} and {ours} both set: keep one")
            continue
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            problems.append(f"{key}: expected a dataset name or a comma list of names, got {names!r}")
            continue
        try:
            raw[ours] = [registry_entry(name, dataset_dir, media_dir) for name in names]
        except ConfigError as e:
            problems.append(f"{key}: {e}")
            continue
        notes.append(("translated", key, f"{','.join(names)} -> {ours}: " + ", ".join(
            f"{e['path']} (videos under {e['video_root']})" for e in raw[ours])))


def registry_entry(name, dataset_dir, media_dir):
    """One dataset_info.json entry -> a train_datasets entry: file_name relative to dataset_dir,
    sharegpt only, its columns and tags honoured."""
    path = os.path.join(dataset_dir, "dataset_info.json")
    try:
        with open(path, encoding="utf-8") as f:
            registry = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the dataset registry ({e.strerror or e}); set dataset_dir to the "
                          f"folder that holds dataset_info.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON registry ({e})") from None
    if name not in registry:
        raise ConfigError(f"{name!r} is not in {path}; it lists: {', '.join(registry) or '(nothing)'}")
    info = registry[name]
    where = f"{path} entry {name!r}"
    if not isinstance(info, dict) or "file_name" not in info:
        raise ConfigError(f"{where}: only local files (file_name) are read here, not hub or script datasets")
    if set(info) - REGISTRY_FIELDS:
        raise ConfigError(f"{where}: {sorted(set(info) - REGISTRY_FIELDS)} not supported here (it reads "
                          f"{sorted(REGISTRY_FIELDS)}); remove them or use train_datasets")
    if info.get("formatting", "alpaca") != "sharegpt":
        raise ConfigError(f"{where}: formatting {info.get('formatting', 'alpaca')!r}; only sharegpt records "
                          f"(messages with <video> and <ACT>) are read here")
    columns = {**SHAREGPT_COLUMNS, **info.get("columns", {})}
    tags = {**SHAREGPT_TAGS, **info.get("tags", {})}
    extra = set(columns) - set(NATIVE_COLUMNS)
    if extra:
        raise ConfigError(f"{where}: columns {sorted(extra)} have no use here (a record is messages, one video, "
                          f"action_label)")
    file = os.path.join(dataset_dir, info["file_name"])
    if not os.path.isfile(file):
        raise ConfigError(f"{where}: {file} is not a file (check dataset_dir; a folder of files is not read here)")
    entry = {"path": file, "video_root": media_dir, "name": name}
    if {**NATIVE_COLUMNS, **columns} != NATIVE_COLUMNS:
        entry["columns"] = columns
    if {k: tags[k] for k in NATIVE_TAGS} != NATIVE_TAGS:
        entry["tags"] = {k: tags[k] for k in NATIVE_TAGS}
    return entry


def eval_strategy_key(raw, notes, problems):
    """eval_strategy (HF: evaluation_strategy): steps is what runs here; no and epoch say what to do."""
    for key in ("eval_strategy", "evaluation_strategy"):
        if key not in raw:
            continue
        value = raw.pop(key)
        if value == "steps":
            notes.append(("ignored", key, "steps: evaluation runs every eval_steps and at the end"))
        elif value == "no" and not (raw.get("eval_datasets") or raw.get("eval_dataset")):
            notes.append(("ignored", key, "no: there is no eval dataset"))
        elif value == "no":
            problems.append(f"{key}: no, but an eval dataset is set: remove eval_dataset to train without evaluation")
        else:
            problems.append(f"{key}: {value!r}: evaluation runs every eval_steps; set eval_steps to the steps per "
                            f"epoch (printed at start-up) and eval_strategy: steps")


def gradient_checkpointing_key(raw, notes, problems):
    value = raw.pop("disable_gradient_checkpointing")
    if not is_bool(value):
        return problems.append(f"disable_gradient_checkpointing: expected true or false, got {value!r}")
    if "gradient_checkpointing" in raw:
        return problems.append("disable_gradient_checkpointing and gradient_checkpointing both set: keep one")
    raw["gradient_checkpointing"] = not value
    notes.append(("translated", "disable_gradient_checkpointing", f"{shown(value)} -> gradient_checkpointing: {shown(not value)}"))


def cutoff_key(raw, notes, problems):
    """cutoff_len truncates long samples in LLaMA-Factory; here inputs end at <ACT> and are never cut,
    so it is ignored when no sample can reach it, else refused (a cut would drop video tokens)."""
    value = raw.pop("cutoff_len")
    if isinstance(value, bool) or not isinstance(value, int):
        return problems.append(f"cutoff_len: expected an int, got {value!r}")
    frames = raw.get("video_num_frames") or raw.get("video_maxlen", Config.video_maxlen)
    pixels = raw.get("video_max_pixels", Config.video_max_pixels)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (frames, pixels)):
        return  # a type problem of those keys, reported by config_problems
    longest = math.ceil(frames / 2) * int(pixels // PIXELS_PER_TOKEN) + TEXT_TOKENS
    if longest <= value:
        return notes.append(("ignored", "cutoff_len", f"{value}: no sample reaches it (at most ~{longest} tokens: "
                             f"{frames} frames at video_max_pixels {pixels}, plus the prompt); inputs end at <ACT>"))
    problems.append(f"cutoff_len: {value}, but a sample can reach ~{longest} tokens ({frames} frames at "
                    f"video_max_pixels {pixels}); inputs are never truncated here (a cut would drop video tokens "
                    f"or <ACT>): lower video_maxlen or video_max_pixels to fit, or remove cutoff_len")


# Keys translated by a function (it pops its key(s)), in this order: datasets before eval_strategy.
TRANSLATORS = {"flash_attn": attention_key, "resume_from_checkpoint": resume_key, "stage": stage_key,
               "do_train": task_keys, "do_eval": task_keys, "do_predict": task_keys,
               "adapter_name_or_path": task_keys, "action_decoder_path": decoder_path_key,
               "dataset": dataset_keys, "eval_dataset": dataset_keys, "dataset_dir": dataset_keys,
               "media_dir": dataset_keys, "eval_strategy": eval_strategy_key, "evaluation_strategy": eval_strategy_key,
               "disable_gradient_checkpointing": gradient_checkpointing_key, "cutoff_len": cutoff_key}


def lf_key_kind(key):
    """How a key is handled: "field" (a Config key), "translated", "ignored", "refused" (but accepted
    at its off value), or None (unknown)."""
    if key in {f.name for f in dataclasses.fields(Config)}:
        return "field"
    if key in TRANSLATORS:
        return "translated"
    return "ignored" if key in IGNORED else "refused" if key in REFUSED else None


def translate_lf_keys(raw):
    """A raw config with LLaMA-Factory/IVCP keys -> (raw with Config keys only, notes, problems).
    notes: [(kind, key, text)] to list once at start-up; kind is translated, ignored or warning."""
    raw, notes, problems = dict(raw), [], []
    for key in list(raw):
        if key in IGNORED:
            notes.append(("ignored", key, f"{shown(raw.pop(key))}: {IGNORED[key]}"))
        elif key in REFUSED:
            harmless, reason = REFUSED[key]
            value = raw.pop(key)
            if any(value == h and type(value) is type(h) for h in harmless):
                notes.append(("ignored", key, f"{shown(value)}: as here ({reason})"))
            else:
                problems.append(f"{key}: {shown(value)} is not supported: {reason}")
    done = set()
    for key, translate in TRANSLATORS.items():
        if key in raw and translate not in done:
            done.add(translate)
            translate(raw, notes, problems)
    if raw.get("eval_only") is True and isinstance(raw.get("checkpoint"), str):
        base_model_key(raw, notes, problems)
    return raw, notes, problems


def looks_like_a_path(name):
    """A folder path rather than a Hugging Face hub name ("Qwen/Qwen2.5-VL-3B-Instruct")."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1


def base_model_key(raw, notes, problems):
    """Evaluating an actcls checkpoint: model_name_or_path defaults to the base model the checkpoint
    was trained on (its config.yaml says which), and replaces a path that does not exist on this
    machine (an eval YAML written on another). A hub name, or a folder that is here, is kept:
    checkpoint.check_base_model then compares its architecture with the checkpoint's."""
    directory, given = raw["checkpoint"], raw.get("model_name_or_path")
    if given is not None and (not isinstance(given, str) or os.path.isdir(given) or not looks_like_a_path(given)):
        return
    if folder_kind(directory) != "checkpoint":
        return  # the checkpoint's own check says what the folder is
    saved = read_yaml(os.path.join(directory, "config.yaml")).get("model_name_or_path")
    if os.path.isdir(saved) or not looks_like_a_path(saved):
        raw["model_name_or_path"] = saved
        was = "not set" if given is None else f"{given} does not exist here"
        notes.append(("translated", "model_name_or_path", f"{was}; {saved}: the base model {directory} was "
                      f"trained on"))
        return
    missing = "" if given is None else f"{given} does not exist here, nor does "
    problems.append(f"model_name_or_path: {missing}the base model {directory} was trained on, {saved}: pass "
                    f"--model_name_or_path with the folder that holds {os.path.basename(saved.rstrip('/'))} on "
                    f"this machine")


def format_notes(notes):
    """The start-up lines for translate_lf_keys's notes: what was translated, what is ignored and why."""
    titles = {"warning": "warning", "translated": "LLaMA-Factory/IVCP key translated",
              "ignored": "ignored (no effect here)"}
    return [f"{titles[kind]}: {key}: {text}" for kind in ("warning", "translated", "ignored")
            for k, key, text in notes if k == kind]



def renamed_record(record, columns, tags):
    """A record in a registry's own column and tag names (dataset_info.json `columns`, `tags`) ->
    this format's names: messages [{role: user|assistant, content}], videos, action_label."""
    if not isinstance(record, dict):
        return record
    out = {ours: record[theirs] for ours, theirs in (columns or {}).items() if theirs in record}
    out = {**{k: v for k, v in record.items() if k not in (columns or {}).values()}, **out}
    if tags and isinstance(out.get("messages"), list):
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant"}
        out["messages"] = [{"role": roles.get(m.get(tags["role_tag"]), m.get(tags["role_tag"])),
                            "content": m.get(tags["content_tag"])} if isinstance(m, dict) else m
                           for m in out["messages"]]
    return out


def parse_config(argv, description=None, notes=None):
    """`--config FILE` and `--key value` overrides (config.read_command_line) -> a validated Config,
    LLaMA-Factory/IVCP keys translated first. Pass a list as `notes` to get the start-up lines saying
    what was translated or ignored, and why. All problems are reported together (ConfigError)."""
    raw, where = read_command_line(argv, description)
    raw, translated, problems = translate_lf_keys(raw)
    if notes is not None:
        notes.extend(format_notes(translated))
    return validated_config(raw, where, problems, also_known=[*TRANSLATORS, *IGNORED, *REFUSED])

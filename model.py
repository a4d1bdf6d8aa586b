"""The VLM backbone + <ACT> token + ActionDecoder heads, as one module whose forward returns logits.

    batch -> Qwen-VL inner model (LoRA/DoRA) -> last hidden state at <ACT> -> ActionDecoder -> logits

One code path for every Qwen-VL family in transformers (qwen2_vl, qwen2_5_vl, qwen3_vl,
qwen3_vl_moe, qwen3_5, qwen3_5_moe), chosen by model_name_or_path alone. What differs is read from
the model and its processor: the forward's extra inputs (whatever the processor returns, see
data.Collator), the frame geometry (vision_geometry), the vocabulary (load_vlm). Module names are
the same in all six (LM_PREFIX and the rest below).

Design choices, each for a reason:
- The forward goes through the inner model (`vlm.model`: Qwen2_5_VLModel, Qwen3VLModel, ...), never
  the LM head: a classifier needs one hidden state per sample, not 151,936-way (Qwen3.5: 248,320)
  logits at every position.
  (With action_cls_token_loss_weight > 0, the LM head runs at the answer's positions only.)
- A `transformer` head also reads the video tokens' last-layer states, from the same forward.
- The `<ACT>` row is its own parameter (`act_embedding`), written into the embedded sequence where
  the token sits by a forward hook on the input embedding (the model's forward itself runs from
  input_ids, untouched). The table stays frozen, so no other row can move (no gradient masks,
  no weight decay leaking into frozen rows) and the optimizer holds one row of state, not the table.
- Inputs arrive cut right after `<ACT>` (see data.py): with causal attention nothing after it can
  change its hidden state. With the token loss on, they are cut after the answer's last token.
"""

import hashlib
import json
import os
import pickle
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from config import IVCP_TRANSFORMER_HEAD, ConfigError, write_config
from decoder import TRANSFORMER_TYPES, ActionDecoder, from_ivcp, ivcp_decoder_type

ACT_TOKEN = "<ACT>"
# Module names, the same in every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE)):
LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
VISION_BLOCKS_PREFIX = "model.visual.blocks."
# The multi-modal projector: the merger, plus Qwen3-VL's deepstack mergers, which project
# intermediate vision features into the first language-model layers.
PROJECTOR_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded into this model/config; the message says why."""


def load_processor(path, trust_remote_code=False):
    """The model's processor with `<ACT>` registered as a special token; returns (processor, act_id)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    tokenizer.add_special_tokens({"extra_special_tokens": [ACT_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.padding_side = "right"  # data.answer_mask counts each row's answer back from its last real token
    return processor, tokenizer.convert_tokens_to_ids(ACT_TOKEN)


def vision_geometry(processor):
    """The family's frame geometry, from its own video processor: frame sides are multiples of
    patch_size x merge_size (14 x 2 for Qwen2/2.5-VL, 16 x 2 for Qwen3-VL/3.5) and frame counts of
    temporal_patch_size. Keyword arguments of video.VideoSettings (config.video_settings)."""
    video = processor.video_processor
    return {"resize_factor": video.patch_size * video.merge_size, "temporal_patch_size": video.temporal_patch_size}


def load_vlm(cfg, act_token_id):
    from transformers import AutoModelForImageTextToText

    # Frozen base weights can live in bf16; weights that train stay fp32 (autocast does the rest).
    dtype = torch.bfloat16 if cfg.bf16 and cfg.finetuning_type != "full" else torch.float32
    vlm = AutoModelForImageTextToText.from_pretrained(
        cfg.model_name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code)
    rows = vlm.get_input_embeddings().weight.shape[0]
    if act_token_id >= rows:  # Qwen2.5-VL's table has spare rows, so this is for other tokenizers
        vlm.resize_token_embeddings(act_token_id + 1)
    return vlm


def lora_target_names(vlm, cfg):
    """Full names of the Linear layers that get adapters: the language model's, plus the vision
    blocks' and the merger's when those are not frozen. `lora_target: all` means every Linear."""
    wanted = None if cfg.lora_target == "all" else {t.strip() for t in cfg.lora_target.split(",")}
    prefixes = [LM_PREFIX]
    if not cfg.freeze_vision_tower:
        prefixes.append(VISION_BLOCKS_PREFIX)
    if not cfg.freeze_multi_modal_projector:
        prefixes += PROJECTOR_PREFIXES
    names = [name for name, module in vlm.named_modules()
             if isinstance(module, nn.Linear) and name.startswith(tuple(prefixes))
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ConfigError(f"lora_target={cfg.lora_target!r} matches no Linear layer of {cfg.model_name_or_path}")
    return names


def additional_targets(cfg):
    return [t.strip() for t in cfg.additional_target.split(",") if t.strip()] if cfg.additional_target else []


def apply_finetuning(vlm, cfg):
    """Returns the module to train: peft-wrapped for lora, the VLM itself for full / freeze."""
    vlm.requires_grad_(False)
    if cfg.finetuning_type == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, target_modules=lora_target_names(vlm, cfg),
                          modules_to_save=additional_targets(cfg) or None)
        vlm = get_peft_model(vlm, lora)
    else:
        trainable = []
        if cfg.finetuning_type == "full":
            trainable.append(LM_PREFIX + "layers.")
            trainable.append(LM_PREFIX + "norm.")
            if not cfg.freeze_vision_tower:
                trainable.append(VISION_PREFIX)
            elif not cfg.freeze_multi_modal_projector:
                trainable += PROJECTOR_PREFIXES
        trainable += [f"model.{t}" if not t.startswith("model.") else t for t in additional_targets(cfg)]
        for name, param in vlm.named_parameters():
            if name.startswith(tuple(trainable)):
                param.requires_grad_(True)
    for param in vlm.parameters():  # what trains stays fp32 under a bf16 base (autocast does the rest)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs and with DDP's no_sync. Active in train mode only
        # (train.py puts the model there: from_pretrained leaves it in eval mode).
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return vlm


class ActionClassifier(nn.Module):
    def __init__(self, vlm, act_token_id, heads, act_row=None, video_token_id=None):
        """act_row: the trained <ACT> row (an export's table holds it); by default a new token starts
        from the mean of the existing vocabulary rows (as LLaMA-Factory does for added tokens).
        video_token_id: the processor's video placeholder token (where the video tokens' states sit,
        for `transformer` heads); by default the model config's."""
        super().__init__()
        self.vlm = vlm
        self.act_token_id = act_token_id
        self.video_token_id = video_token_id if video_token_id is not None else vlm.config.video_token_id
        self.heads = nn.ModuleDict(heads)
        embedding = self.backbone.get_input_embeddings()
        start = embedding.weight[:act_token_id].mean(0) if act_row is None else act_row
        self.act_embedding = nn.Parameter(start.float().detach().clone())  # fp32: it trains
        # The backbone's own forward runs unchanged from input_ids in every family (M-RoPE positions,
        # Qwen3-VL's deepstack and placeholder masks all need input_ids, and Qwen3-VL refuses
        # input_ids + inputs_embeds together); a forward hook on its input embedding writes the
        # trainable <ACT> row into the embedded sequence.
        self.act_row_hook = embedding.register_forward_hook(self.put_act_row)

    @property
    def backbone(self):
        """The inner model (vision tower + language model, no LM head: Qwen2_5_VLModel, Qwen3VLModel,
        ...). A property, not a submodule, so its parameters are not registered twice."""
        vlm = self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm
        return vlm.model

    def put_act_row(self, embedding, args, embeds):
        is_act = (args[0] == self.act_token_id).unsqueeze(-1)
        return torch.where(is_act, self.act_embedding.to(embeds.dtype), embeds)

    def last_hidden_state(self, input_ids, **inputs):
        """The backbone's last-layer hidden states, (B, L, hidden): one forward gives the <ACT> state,
        the video tokens' states and the answer positions' states alike. `inputs`: the rest of
        data.Collator's model inputs (attention_mask, pixel_values_videos, video_grid_thw and the
        family's own keys: mm_token_type_ids, second_per_grid_ts), passed to the backbone as they are."""
        return self.backbone(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state

    def act_hidden(self, input_ids, act_index, **inputs):
        """Last-layer hidden state at each row's <ACT> token: (B, hidden)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.last_hidden_state(input_ids, **inputs)[rows, act_index]

    def forward(self, label_space, input_ids, act_index, answer_mask=None, **inputs):
        """Class logits (B, classes). With `answer_mask` (data.Collator's when
        action_cls_token_loss_weight > 0): (logits, the LM loss on the answer tokens)."""
        hidden = self.last_hidden_state(input_ids, **inputs)
        head = self.heads[label_space]
        act = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), act_index]
        logits = head(act, *masked_rows(hidden, input_ids == self.video_token_id)) if head.uses_video else head(act)
        if answer_mask is None:
            return logits
        return logits, self.answer_loss(hidden, input_ids, answer_mask)

    def answer_loss(self, hidden, input_ids, answer_mask):
        """Mean cross-entropy of each answer token predicted from the position before it: what a causal
        LM forward with labels = input_ids (-100 outside the answer) computes, but lm_head runs on
        the answer's positions only, (answer tokens, vocab) instead of (B, L, vocab)."""
        before = torch.zeros_like(answer_mask)
        before[:, :-1] = answer_mask[:, 1:]  # the position that predicts each answer token
        states = hidden[before]
        lm_head = self.vlm.get_output_embeddings()
        logits = lm_head(states)
        if lm_head.weight is self.backbone.get_input_embeddings().weight:
            # tied (Qwen2.5-VL-3B): the <ACT> row is act_embedding in the table, so in the LM head too,
            # as in the exported model (merged_backbone writes it into the shared table)
            logits[:, self.act_token_id] = states @ self.act_embedding.to(states.dtype)
        return F.cross_entropy(logits.float(), input_ids[answer_mask])


def masked_rows(hidden, mask):
    """hidden (B, L, H), mask (B, L) -> each row's masked positions in order, (B, N, H) zero-padded to
    the row with the most (N), and (B, N) True where a state is real."""
    counts = mask.sum(1)
    n = int(counts.max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]  # masked positions first, in order
    valid = torch.arange(n, device=mask.device) < counts[:, None]
    states = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return states.masked_fill(~valid.unsqueeze(-1), 0), valid


def build_classifier(cfg, head_sizes, processor=None):
    """head_sizes: {label_space: num_classes}; processor: load_processor's, when the caller has it
    already. Returns (processor, ActionClassifier)."""
    if processor is None:
        processor, _ = load_processor(cfg.model_name_or_path, cfg.trust_remote_code)
    act_token_id = processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN)
    vlm = apply_finetuning(load_vlm(cfg, act_token_id), cfg)
    hidden = vlm.config.get_text_config().hidden_size
    if cfg.action_decoder_type in TRANSFORMER_TYPES and hidden % cfg.action_decoder_num_heads:
        raise ConfigError(f"action_decoder_num_heads={cfg.action_decoder_num_heads} must divide the hidden size of "
                          f"{cfg.model_name_or_path} ({hidden}); pick a divisor of {hidden}")
    heads = {}
    for space, num_classes in head_sizes.items():
        if cfg.action_decoder_path is not None and len(head_sizes) == 1:
            heads[space] = pretrained_head(cfg.action_decoder_path)
        else:
            heads[space] = ActionDecoder(hidden, num_classes, cfg.action_decoder_type, cfg.action_decoder_hidden_size,
                                         cfg.action_decoder_num_transformer_layers, cfg.action_decoder_num_heads,
                                         cfg.action_decoder_dropout)
        if heads[space].config["hidden_size"] != hidden:
            raise ConfigError(f"action_decoder_path {cfg.action_decoder_path}: the head reads a hidden state of "
                              f"size {heads[space].config['hidden_size']}, {cfg.model_name_or_path} gives {hidden}; "
                              f"it was trained on another base model")
        if heads[space].config["num_classes"] != num_classes:
            raise ConfigError(f"action_decoder_path {cfg.action_decoder_path} has "
                              f"{heads[space].config['num_classes']} classes, the config says {num_classes}")
    return processor, ActionClassifier(vlm, act_token_id, heads, video_token_id=processor.video_token_id)


def merged_backbone(model):
    """The classifier's VLM as a plain Hugging Face model that computes the same <ACT> hidden state:
    LoRA/DoRA merged into the base weights (peft's merge_and_unload, which also puts trained
    `additional_target` copies in place), and the trained <ACT> row written into the input
    embedding table, so no separate `act_embedding` is needed. Returns (vlm, tied): with tied
    embeddings (`lm_head` shares the table, as in Qwen2.5-VL-3B) the LM head's <ACT> row changes too;
    the classifier never runs lm_head, and a text generation can only ever see it as the logit of
    emitting <ACT>. Consumes `model` (the merge happens in place)."""
    vlm = model.vlm.merge_and_unload() if hasattr(model.vlm, "merge_and_unload") else model.vlm
    table = vlm.get_input_embeddings().weight
    output = vlm.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == table.data_ptr()
    with torch.no_grad():
        table[model.act_token_id] = model.act_embedding.to(table.dtype)
    return vlm, tied


def load_exported(directory, act_token_id, spaces, dtype, attn_implementation="sdpa"):
    """An export.py folder -> ActionClassifier: the backbone through plain `from_pretrained` (no
    peft, no base model needed), the <ACT> row read back from its embedding table, the heads from
    heads/<label_space>/."""
    from transformers import AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    heads = {space: ActionDecoder.from_pretrained(os.path.join(directory, "heads", space)) for space in spaces}
    table = vlm.get_input_embeddings().weight
    if act_token_id >= table.shape[0]:
        raise CheckpointError(f"{directory}: <ACT> is token {act_token_id}, but the embedding table has "
                              f"{table.shape[0]} rows")
    return ActionClassifier(vlm, act_token_id, heads, act_row=table[act_token_id])


def pretrained_head(directory):
    """action_decoder_path: a folder ActionDecoder.save_pretrained wrote, or IVCP's linear/mlp head."""
    ivcp_type = ivcp_decoder_type(directory)
    if ivcp_type in ("linear", "mlp"):
        return from_ivcp(directory)
    if ivcp_type is not None:
        raise ConfigError(IVCP_TRANSFORMER_HEAD.format(path=directory))
    if not os.path.isfile(os.path.join(directory, "action_decoder.json")):
        raise ConfigError(f"action_decoder_path {directory}: no action_decoder.json there; point it at a folder "
                          f"ActionDecoder.save_pretrained wrote (a checkpoint's heads/<label_space>)")
    return ActionDecoder.from_pretrained(directory)


def build_optimizer(model, cfg):
    """Named AdamW groups. Adapters/trained layers at learning_rate (no decay on biases and norms),
    heads at learning_rate * head_lr_scale, the <ACT> row at learning_rate * action_token_lr_scale."""
    groups = {"backbone": [], "backbone_no_decay": [], "head": [], "head_no_decay": [], "act_token": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name
        if name == "act_embedding":
            groups["act_token"].append(p)
        elif name.startswith("heads."):
            groups["head_no_decay" if no_decay else "head"].append(p)
        else:
            groups["backbone_no_decay" if no_decay else "backbone"].append(p)
    lr, head_lr = cfg.learning_rate, cfg.learning_rate * cfg.head_lr_scale
    settings = {"backbone": (lr, cfg.weight_decay), "backbone_no_decay": (lr, 0.0),
                "head": (head_lr, cfg.weight_decay), "head_no_decay": (head_lr, 0.0),
                "act_token": (lr * cfg.action_token_lr_scale, 0.0)}
    param_groups = [{"name": n, "params": ps, "lr": settings[n][0], "weight_decay": settings[n][1]}
                    for n, ps in groups.items() if ps]
    grouped = [id(p) for g in param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped), \
        "every trainable parameter must be in exactly one optimizer group"
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2))


# ---------------------------------------------------------------------------------------------------
# Weights: only what trains is saved (adapters / trained layers, the <ACT> row, the heads); the
# frozen base comes from model_name_or_path again.

def full_trainable_state(model, keep=True):
    """Every trainable parameter (adapters / trained layers, the <ACT> row, the heads) by name, as a
    whole CPU tensor. Under FSDP2 (train.py's `fsdp`) each parameter is a DTensor shard and
    `full_tensor()` all-gathers it: a collective, so then every rank must call this (the same
    parameters in the same order: named_parameters). `keep=False`, on ranks that do not write:
    gather and drop, so only the writer holds a CPU copy (one whole parameter at a time elsewhere)."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            if keep:
                state[name] = whole.contiguous().cpu()
    return state


def trainable_backbone_state(model):
    return {name: t for name, t in full_trainable_state(model).items() if not name.startswith("heads.")}


def save_weights(model, directory, state=None):
    """`state`: full_trainable_state(model) gathered beforehand (FSDP2: every rank gathers, one
    writes); by default it is gathered here. The files are the same either way, so a checkpoint
    written by a sharded run loads into a plain model (load_weights, predict.py, a DDP resume)."""
    state = full_trainable_state(model) if state is None else state
    os.makedirs(directory, exist_ok=True)
    save_file({k: v for k, v in state.items() if not k.startswith("heads.")},
              os.path.join(directory, "trainable.safetensors"))
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
        state = load_file(os.path.join(directory, "trainable.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory}: cannot read trainable.safetensors ({e}); is it a checkpoints/step_* "
                              f"folder?") from None
    expected = trainable_backbone_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
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
        if any(isinstance(n, int) for _, names in theirs for n in names):
            raise CheckpointError(f"{path} keys Adam's state by position (written before it was keyed by "
                                  f"parameter name); it cannot be resumed by this version")
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
# Checkpoint folders (train.py writes them atomically): weights, optimizer.pt, config.yaml,
# classes.json, trainer_state.json (with the base model's fingerprint), rng_rank*.pt

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
    with open(os.path.join(directory, "trainer_state.json")) as f:
        saved_base = json.load(f).get("base_model")
    if saved_base is None:  # written before fingerprints existed
        return
    base = base_model_fingerprint(cfg)
    saved_type = saved_base.get("model_type")
    if saved_type is not None and saved_type != base["model_type"]:
        raise CheckpointError(f"{directory} was trained on a {saved_type} model ({saved_base['model_name_or_path']}), "
                              f"but this config's model_name_or_path {base['model_name_or_path']} is a "
                              f"{base['model_type']} model: a checkpoint only loads onto its own family; point "
                              f"model_name_or_path at the checkpoint's base model")
    if saved_base["config_sha256"] != base["config_sha256"]:
        raise CheckpointError(f"{directory} was trained on {saved_base['model_name_or_path']}, but this config's "
                              f"model_name_or_path is {base['model_name_or_path']} (a different architecture/config): "
                              f"point model_name_or_path at the checkpoint's base model")


def gather_training_state(model, optimizer, keep=True):
    """(weights, optimizer state) as whole CPU tensors keyed by name: what write_checkpoint_files
    writes. Under FSDP2 a collective: every rank calls it, ranks with keep=False drop the result.
    optimizer None (save_only_model): (weights, None)."""
    reshard_fsdp(model)
    return full_trainable_state(model, keep), None if optimizer is None else optimizer_state(model, optimizer, keep)


def write_checkpoint_files(directory, model, gathered, state, cfg, classes):
    """gathered: gather_training_state's (weights, optimizer state); no optimizer.pt when that is None
    (save_only_model: state then says weights_only)."""
    weights, optim = gathered
    save_weights(model, directory, weights)
    if optim is not None:
        torch.save(optim, os.path.join(directory, "optimizer.pt"))  # the schedule is a function of step
    write_config(cfg, os.path.join(directory, "config.yaml"))
    with open(os.path.join(directory, "classes.json"), "w") as f:
        json.dump(classes, f)
    with open(os.path.join(directory, "trainer_state.json"), "w") as f:
        json.dump({**state, "base_model": base_model_fingerprint(cfg)}, f)
    for dirpath, _, files in os.walk(directory):  # on disk before the rename makes it visible
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def checkpoint_problem(directory):
    """Why a checkpoint folder cannot be read, or None. Every file a resume reads is opened the way it
    will be read (safetensors headers checked against the file size, zip archives' directories,
    JSON parsed), cheaply: tensors stay on disk. Whether the weights fit this model is
    load_checkpoint's business, not this."""
    if not os.path.isdir(directory):
        return "not a folder"
    try:
        with open(os.path.join(directory, "trainer_state.json")) as f:
            trainer = json.load(f)
        trainer["step"]
        for name in ["trainable.safetensors"] + [os.path.join("heads", space, "action_decoder.safetensors")
                                                 for space in os.listdir(os.path.join(directory, "heads"))]:
            with safe_open(os.path.join(directory, name), "pt"):
                pass
        optimizer = [] if trainer.get("weights_only") else ["optimizer.pt"]  # save_only_model: weights alone
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


def load_checkpoint(directory, model, cfg):
    """A resume, part 1: the weights, into the plain model (before DDP or FSDP2 wraps it). Returns
    the trainer state (step, epoch, position, best_metric, and weights_only for save_only_model)."""
    if not os.path.isfile(os.path.join(directory, "trainer_state.json")):
        raise CheckpointError(f"{directory} is not a checkpoint folder (no trainer_state.json): pass a "
                              f"checkpoints/step_NNNNNNN folder")
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(f"{directory}: the checkpoint cannot be read ({problem})")
    with open(os.path.join(directory, "trainer_state.json")) as f:
        state = json.load(f)
    state.pop("base_model", None)
    check_base_model(directory, cfg)
    load_weights(model, directory)
    return state


# ---------------------------------------------------------------------------------------------------
# FSDP2: sharding the classifier over the ranks (train.py's `fsdp`)

def shard_fsdp(model, device, world):
    """FSDP2 (`fully_shard`) for models that do not fit with DDP: each rank holds 1/world of every
    parameter, gradient and Adam moment. Each language-model decoder layer and each vision block is
    a unit (all-gathered just before it runs, freed after), then the root takes the rest (embedding
    table, patch embedding, merger, final norm, <ACT> row, heads). In place: `model` keeps its methods
    and parameter names, but its parameters become DTensor shards, so weights are loaded before this
    and the optimizer is built after it. Returns `model`: it is its own wrapper."""
    trained = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    if len(trained) > 1:  # a unit's gradients are reduce-scattered as one flat buffer of one dtype
        raise ConfigError(f"fsdp: the trained parameters are {trained}; FSDP2 needs one dtype (with bf16, "
                          f"lora/freeze keeps additional_target modules in bf16 beside fp32 adapters)")
    with torch.no_grad():  # rank 0's weights everywhere, as DDP does (each rank seeded its random inits apart)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (world,))
    for block in [*model.backbone.language_model.layers, *model.backbone.visual.blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard_fsdp(model):
    """Before gathering whole tensors for a checkpoint. An eval forward leaves FSDP2's root unit
    unsharded (it reshards the root after backward only), with plain tensors where the optimizer's
    DTensors belong: reshard, so names and optimizer parameters line up again. No-op without FSDP2."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

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

import functools
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from chat import ACT_TOKEN
from checkpoint import CheckpointError
from config import ConfigError
from decoder import TRANSFORMER_TYPES, ActionDecoder, from_ivcp, ivcp_decoder_type
from llamafactory import IVCP_TRANSFORMER_HEAD

# Module names, the same in every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE)):
LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
VISION_BLOCKS_PREFIX = "model.visual.blocks."
# The multi-modal projector: the merger, plus Qwen3-VL's deepstack mergers, which project
# intermediate vision features into the first language-model layers.
PROJECTOR_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


def load_processor(path, trust_remote_code=False):
    """The model's processor with `<ACT>` registered as a special token; returns (processor, act_id).
    Loaded once per process for the same folder contents (building a tokenizer takes 1-4 s: Qwen3.5's
    248k-entry one is rebuilt from its vocabulary on every load), so the object is shared: use it,
    do not change it."""
    return processor_of(path, trust_remote_code, folder_fingerprint(path))


def folder_fingerprint(path):
    """(name, size, mtime) of a local folder's files, so a folder written anew is loaded anew; None
    for a hub name."""
    if not os.path.isdir(path):
        return None
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))


@functools.lru_cache(maxsize=8)
def processor_of(path, trust_remote_code, fingerprint):
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


def load_vlm(cfg, act_token_id, weights=True):
    """weights=False: the architecture alone, on the meta device (names, shapes, tying; no memory and
    no weight file read), for what needs the model's layout but streams its weights (merge.py)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    # Frozen base weights can live in bf16; weights that train stay fp32 (autocast does the rest).
    dtype = torch.bfloat16 if cfg.bf16 and cfg.finetuning_type != "full" else torch.float32
    options = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if weights:
        vlm = AutoModelForImageTextToText.from_pretrained(cfg.model_name_or_path, **options)
    else:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            vlm = AutoModelForImageTextToText.from_config(config, **options)
    rows = vlm.get_input_embeddings().weight.shape[0]
    if act_token_id >= rows:  # every Qwen-VL family's table has spare rows: this is for other tokenizers
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
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
        return at_positions(self.last_hidden_state(input_ids, **inputs), act_index)

    def forward(self, label_space, input_ids, act_index, answer_mask=None, **inputs):
        """Class logits (B, classes). With `answer_mask` (data.Collator's when
        action_cls_token_loss_weight > 0): (logits, the LM loss on the answer tokens)."""
        hidden = self.last_hidden_state(input_ids, **inputs)
        head = self.heads[label_space]
        act = at_positions(hidden, act_index)
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


def at_positions(hidden, index):
    """hidden (B, L, H), index (B,) -> (B, H): each row's state at its own position."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def masked_rows(hidden, mask):
    """hidden (B, L, H), mask (B, L) -> each row's masked positions in order, (B, N, H) zero-padded to
    the row with the most (N), and (B, N) True where a state is real."""
    counts = mask.sum(1)
    n = int(counts.max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]  # masked positions first, in order
    valid = torch.arange(n, device=mask.device) < counts[:, None]
    states = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return states.masked_fill(~valid.unsqueeze(-1), 0), valid


def build_classifier(cfg, head_sizes, processor=None, weights=True):
    """head_sizes: {label_space: num_classes}; processor: load_processor's, when the caller has it
    already; weights=False: the backbone on the meta device (load_vlm), the heads real. Returns
    (processor, ActionClassifier)."""
    if processor is None:
        processor, _ = load_processor(cfg.model_name_or_path, cfg.trust_remote_code)
    act_token_id = processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN)
    vlm = apply_finetuning(load_vlm(cfg, act_token_id, weights), cfg)
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
    emitting <ACT>. Consumes `model` (the merge happens in place). export.py streams the same merge
    tensor by tensor instead (merge.py); this in-memory one is its reference (tests/test_merge.py)."""
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

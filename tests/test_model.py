"""The model: hidden state at <ACT>, what trains, learning rates, saving and loading."""

import dataclasses
import os

import pytest
import torch

from config import Config
from data import Collator, VideoDataset, load_samples, prompt_messages
from decoder import ActionDecoder
from checkpoint import load_weights, save_weights
from model import LM_PREFIX, build_classifier, build_optimizer, vision_geometry
from video import VideoSettings


SETTINGS = VideoSettings(video_fps=4, video_maxlen=8, video_num_frames=None, video_min_pixels=3136,
                         video_max_pixels=3136)  # the default Qwen2.5-VL geometry (tests of one family)


def settings_for(processor):
    """4 fps, up to 8 frames, one patch grid of about 56 x 56 px, in the family's own geometry."""
    return VideoSettings(video_fps=4, video_maxlen=8, video_num_frames=None, video_min_pixels=3136,
                         video_max_pixels=3136, **vision_geometry(processor))


def make_cfg(tiny_model_dir, **overrides):
    cfg = Config(model_name_or_path=tiny_model_dir, num_action_classes=6, lora_rank=4, lora_alpha=8,
                 use_dora=True, learning_rate=1e-2, weight_decay=0.1, warmup_steps=0)
    return dataclasses.replace(cfg, **overrides)


def perturb_adapters(model, seed=0):
    """LoRA B starts at zero (adapter = identity); make the adapters do something so the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.act_embedding.add_(torch.randn(model.act_embedding.shape, generator=g))


def batch_of(synthetic_dir, processor, act_id, indices, messages=None):
    samples, _ = load_samples(os.path.join(synthetic_dir, "train.jsonl"), None, 6)
    if messages is not None:  # vary prompt lengths so the batch needs padding
        for i, m in zip(indices, messages):
            samples[i] = dataclasses.replace(samples[i], messages=m)
    dataset = VideoDataset(samples, settings_for(processor))
    return Collator(processor, act_id)([dataset[(i, 0, False)] for i in indices])


def conversation(question, answer):
    return [{"role": "user", "content": f"<video>{question}"}, {"role": "assistant", "content": answer}]


def reference_act_hidden(model, processor, item_messages, frames_batch):
    """Hidden state at <ACT> from a plain ...ForConditionalGeneration forward with
    output_hidden_states=True on the whole, uncut conversation, one sample at a time (no padding),
    with the <ACT> row in the embedding table and the classifier's hook removed."""
    full_model = model.vlm  # the same (peft-wrapped) weights, called the way the peer does
    embedding = model.backbone.get_input_embeddings()
    table = embedding.weight
    with torch.no_grad():
        saved_row = table[model.act_token_id].clone()
        table[model.act_token_id] = model.act_embedding  # a full model keeps <ACT> in its table
    model.act_row_hook.remove()
    out = []
    try:
        for messages, (frames, metadata) in zip(item_messages, frames_batch):
            text = processor.apply_chat_template(prompt_messages(messages), tokenize=False)
            assert not text.endswith("<ACT>")  # really uncut: "." and "<|im_end|>" follow
            inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], do_resize=False,
                               do_sample_frames=False, return_tensors="pt")
            res = full_model(**inputs, output_hidden_states=True)
            position = (inputs["input_ids"][0] == model.act_token_id).nonzero().item()
            out.append(res.hidden_states[-1][0, position])
    finally:
        with torch.no_grad():
            table[model.act_token_id] = saved_row
        model.act_row_hook = embedding.register_forward_hook(model.put_act_row)
    return torch.stack(out)


@pytest.mark.parametrize("indices", [[0], [1, 2, 3]], ids=["single", "padded_batch"])
def test_act_hidden_equals_full_forward_hidden_state(family_model_dir, synthetic_dir, indices):
    from transformers.video_utils import VideoMetadata

    processor, model = build_classifier(make_cfg(family_model_dir), {"default": 6})
    perturb_adapters(model)
    model.eval()
    messages = [conversation("What?", "It is <ACT>."),
                conversation("Please tell me, in detail, which action is being performed here?", "<ACT>"),
                conversation("Classify.", "The action being performed is <ACT>.")][:len(indices)]
    batch = batch_of(synthetic_dir, processor, model.act_token_id, indices, messages)
    if len(indices) > 1:
        assert (batch.inputs["attention_mask"] == 0).any(), "the batch should need padding"
    with torch.no_grad():
        ours = model.act_hidden(**batch.inputs)

    dataset = VideoDataset(load_samples(os.path.join(synthetic_dir, "train.jsonl"), None, 6)[0], settings_for(processor))
    frames = []
    for i in indices:
        item = dataset[(i, 0, False)]
        frames.append((item.frames, VideoMetadata(total_num_frames=item.info.num_frames,
                                                     fps=item.info.fps, frames_indices=item.indices.tolist())))
    with torch.no_grad():
        reference = reference_act_hidden(model, processor, messages, frames)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_parameters_are_adapters_head_and_act_row(family_model_dir, synthetic_dir):
    """lora_target: all = every nn.Linear of the language model (found on the plain model, before
    peft); the vision tower and merger stay frozen, and so does the embedding table."""
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(family_model_dir)
    lm_linears = [n.removeprefix(LM_PREFIX) for n, m in plain.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith(LM_PREFIX)]
    processor, model = build_classifier(make_cfg(family_model_dir), {"default": 6})
    names = trainable_names(model)
    expected = {"act_embedding", "heads.default.net.weight", "heads.default.net.bias"}
    for n in lm_linears:
        prefix = f"vlm.base_model.model.{LM_PREFIX}{n}"
        expected |= {f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight",
                     f"{prefix}.lora_magnitude_vector.default.weight"}
    assert len(lm_linears) >= 2 * 4  # at least 2 layers x (q, k, v, o) or their linear-attention twins
    assert names == expected

    # A few optimizer steps with weight decay on: nothing outside that set moves, not one embedding row.
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    act_before = model.act_embedding.detach().clone()
    optimizer = build_optimizer(model, make_cfg(family_model_dir))
    batch = batch_of(synthetic_dir, processor, model.act_token_id, [0, 1, 2, 3])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model("default", **batch.inputs), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"
    assert not torch.equal(model.act_embedding, act_before), "the <ACT> row should train"


def test_vision_adapters_and_patch_embed_when_unfrozen(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, freeze_vision_tower=False, freeze_multi_modal_projector=False,
                   additional_target="visual.patch_embed")
    _, model = build_classifier(cfg, {"default": 6})
    names = trainable_names(model)
    assert any(".visual.blocks." in n and "lora_A" in n for n in names)
    assert any(".visual.merger." in n and "lora_A" in n for n in names)
    assert any("patch_embed" in n and "modules_to_save" in n for n in names)
    assert not any("embed_tokens" in n for n in names)


def test_act_row_effective_learning_rate(tiny_model_dir, synthetic_dir):
    """Adam's first step moves each coordinate by lr (m/sqrt(v) = sign(g) after bias correction), so
    the first update of the <ACT> row measures its effective learning rate directly."""
    cfg = make_cfg(tiny_model_dir, learning_rate=1e-3, action_token_lr_scale=0.25, weight_decay=0.0)
    processor, model = build_classifier(cfg, {"default": 6})
    perturb_adapters(model)
    optimizer = build_optimizer(model, cfg)
    groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert groups["act_token"] == pytest.approx(1e-3 * 0.25)
    batch = batch_of(synthetic_dir, processor, model.act_token_id, [0, 1, 2, 3])
    before = model.act_embedding.detach().clone()
    head_before = model.heads["default"].net.weight.detach().clone()
    torch.nn.functional.cross_entropy(model("default", **batch.inputs), batch.labels).backward()
    moved = model.act_embedding.grad.abs() > 1e-6  # Adam's eps (1e-8) only matters for ~0 gradients
    optimizer.step()
    step = (model.act_embedding - before).abs()[moved]
    torch.testing.assert_close(step, torch.full_like(step, 1e-3 * 0.25), rtol=1e-2, atol=0)
    head_step = (model.heads["default"].net.weight - head_before).abs()
    assert head_step.max().item() == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_decoder_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    decoder = ActionDecoder(16, 5, kind, mlp_hidden_size=7 if kind == "mlp" else None)
    decoder.save_pretrained(tmp_path)
    loaded = ActionDecoder.from_pretrained(tmp_path)
    assert loaded.config == decoder.config
    x = torch.randn(3, 16)
    assert torch.equal(decoder(x), loaded(x))
    assert loaded(x.to(torch.bfloat16)).dtype == torch.float32  # the head computes in fp32


def test_weights_save_load_gives_identical_logits(family_model_dir, synthetic_dir, tmp_path):
    cfg = make_cfg(family_model_dir, action_decoder_type="mlp", action_decoder_hidden_size=32)
    processor, model = build_classifier(cfg, {"default": 6})
    perturb_adapters(model, seed=1)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p))
    model.eval()
    batch = batch_of(synthetic_dir, processor, model.act_token_id, [0, 1])
    with torch.no_grad():
        expected = model("default", **batch.inputs)
    save_weights(model, tmp_path / "ckpt")

    _, fresh = build_classifier(cfg, {"default": 6})
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh("default", **batch.inputs), expected)
    load_weights(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh("default", **batch.inputs), expected)

    # A checkpoint made with another LoRA rank is refused, not half-loaded.
    _, other = build_classifier(dataclasses.replace(cfg, lora_rank=8), {"default": 6})
    with pytest.raises(ValueError, match="shape"):
        load_weights(other, tmp_path / "ckpt")

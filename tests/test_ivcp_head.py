"""IVCP's model options: the `transformer` / `transformer_no_vision` heads over the <ACT> state and
the video tokens' states from the same forward, and action_cls_token_loss_weight's LM loss on the
answer (lm_head at the answer's positions only)."""

import dataclasses
import json
import os

import pytest
import torch

from data import Collator, VideoDataset, load_samples, prompt_messages
from decoder import ActionDecoder
from checkpoint import load_weights, save_weights
from model import build_classifier, build_optimizer
from tests.test_model import SETTINGS, conversation, make_cfg, perturb_adapters

MESSAGES = [conversation("What?", "It is <ACT>."),
            conversation("Please tell me, in detail, which action is being performed here?", "<ACT>"),
            conversation("Classify.", "The action being performed is <ACT>.")]


def items_of(synthetic_dir, indices, messages, keep_frames=None):
    """Dataset items with the given prompts; keep_frames[k]: keep only that many of item k's frames
    (an even count: 2 frames make one temporal patch), so the batch's videos differ in length."""
    samples, _ = load_samples(os.path.join(synthetic_dir, "train.jsonl"), None, 6)
    for i, m in zip(indices, messages):
        samples[i] = dataclasses.replace(samples[i], messages=m)
    dataset = VideoDataset(samples, SETTINGS)
    items = [dataset[(i, 0, False)] for i in indices]
    for item, keep in zip(items, keep_frames or [None] * len(items)):
        if keep is not None:
            item.frames, item.indices = item.frames[:keep], item.indices[:keep]
    return items


def transformer_cfg(tiny_model_dir, **overrides):
    settings = dict(action_decoder_type="transformer", action_decoder_hidden_size=48,
                    action_decoder_num_transformer_layers=2, action_decoder_num_heads=4)
    return make_cfg(tiny_model_dir, **{**settings, **overrides})


def randomize_heads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["transformer", "transformer_no_vision"])
def test_transformer_decoder_round_trip_records_its_arguments(tmp_path, kind):
    torch.manual_seed(0)
    decoder = ActionDecoder(16, 5, kind, mlp_hidden_size=12, num_transformer_layers=3, num_heads=2, dropout=0.3)
    decoder.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "action_decoder.json").read_text())
    assert saved == dict(hidden_size=16, num_classes=5, decoder_type=kind, mlp_hidden_size=12,
                         num_transformer_layers=3, num_heads=2, dropout=0.3)
    loaded = ActionDecoder.from_pretrained(tmp_path)
    assert len(loaded.transformer_layers) == 3 and loaded.transformer_layers[0].attn.num_heads == 2
    decoder.eval(), loaded.eval()
    x, video, mask = torch.randn(2, 16), torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool)
    args = (video, mask) if kind == "transformer" else ()
    assert torch.equal(decoder(x, *args), loaded(x, *args))
    # IVCP's parameter names, so the layout matches its head file for file
    assert {"projection.weight", "transformer_layers.2.attn.in_proj_weight", "transformer_layers.0.mlp.3.weight",
            "final_norm.weight", "head.3.bias"} <= set(loaded.state_dict())
    # linear/mlp heads record only the arguments they had before, so their older checkpoints still match
    assert set(ActionDecoder(16, 5, "mlp").config) == {"hidden_size", "num_classes", "decoder_type", "mlp_hidden_size"}


def test_transformer_decoder_masks_padding():
    """A padded row gives what the row alone gives, whatever sits in its padding; the video states
    matter (the head is not ignoring them)."""
    torch.manual_seed(0)
    decoder = ActionDecoder(16, 5, "transformer", num_heads=4).eval()
    act, video = torch.randn(2, 16), torch.randn(2, 9, 16)
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    garbage = video.clone()
    garbage[1, 4:] = 1e3
    with torch.no_grad():
        batched = decoder(act, garbage, mask)
        alone = torch.cat([decoder(act[:1], video[:1], mask[:1]), decoder(act[1:], video[1:, :4], mask[1:, :4])])
        unmasked = decoder(act, garbage, torch.ones_like(mask))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[1], alone[1], atol=1e-3)


def test_transformer_head_batched_equals_one_by_one(tiny_model_dir, synthetic_dir):
    """Different prompts and video lengths in one batch: each sample's logits equal its own batch of one."""
    processor, model = build_classifier(transformer_cfg(tiny_model_dir), {"default": 6})
    perturb_adapters(model)
    randomize_heads(model)
    model.eval()
    collate = Collator(processor, model.act_token_id)
    items = items_of(synthetic_dir, [0, 1, 2], MESSAGES, keep_frames=[None, 2, None])
    batch = collate(items)
    video_counts = (batch.inputs["input_ids"] == processor.video_token_id).sum(1)
    assert len(set(video_counts.tolist())) == 2, "the batch should hold videos of different lengths"
    with torch.no_grad():
        batched = model("default", **batch.inputs)
        alone = torch.cat([model("default", **collate([it]).inputs) for it in items])
        # the video states count: change them and the logits move
        other = items_of(synthetic_dir, [3, 4, 5], MESSAGES, keep_frames=[None, 2, None])
        assert not torch.allclose(model("default", **collate(other).inputs), batched, atol=1e-4)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "transformer_no_vision"])
def test_transformer_head_trains_and_checkpoints(tiny_model_dir, synthetic_dir, tmp_path, kind):
    cfg = transformer_cfg(tiny_model_dir, action_decoder_type=kind, action_decoder_dropout=0.0)
    processor, model = build_classifier(cfg, {"default": 6})
    head_params = dict(model.heads["default"].named_parameters())
    optimizer = build_optimizer(model, cfg)
    in_groups = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    assert all(in_groups.get(id(p), "").startswith("head") for p in head_params.values()), "head not in the optimizer"
    before = {n: p.detach().clone() for n, p in head_params.items()}
    batch = Collator(processor, model.act_token_id)(items_of(synthetic_dir, [0, 1, 2, 3], MESSAGES + MESSAGES[:1]))
    loss = torch.nn.functional.cross_entropy(model("default", **batch.inputs), batch.labels)
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in head_params.items() if torch.equal(p, before[n])]
    assert not unchanged, f"head parameters that did not train: {unchanged}"

    model.eval()
    with torch.no_grad():
        expected = model("default", **batch.inputs)
    save_weights(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "heads" / "default" / "action_decoder.json").read_text())
    assert saved["decoder_type"] == kind and saved["num_heads"] == 4 and saved["num_transformer_layers"] == 2
    _, fresh = build_classifier(cfg, {"default": 6})
    fresh.eval()
    load_weights(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh("default", **batch.inputs), expected)

    # a checkpoint's head must match the configured one, not load into another layout
    _, other = build_classifier(dataclasses.replace(cfg, action_decoder_num_transformer_layers=1), {"default": 6})
    with pytest.raises(ValueError, match="head 'default'"):
        load_weights(other, tmp_path / "ckpt")


def test_transformer_head_dropout_only_in_training(tiny_model_dir, synthetic_dir):
    processor, model = build_classifier(transformer_cfg(tiny_model_dir, action_decoder_dropout=0.5), {"default": 6})
    batch = Collator(processor, model.act_token_id)(items_of(synthetic_dir, [0, 1], MESSAGES[:2]))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model("default", **batch.inputs), model("default", **batch.inputs))
        model.eval()
        assert torch.equal(model("default", **batch.inputs), model("default", **batch.inputs))


def test_num_heads_must_divide_hidden_size(tiny_model_dir):
    from config import ConfigError

    with pytest.raises(ConfigError, match="action_decoder_num_heads=5 must divide the hidden size"):
        build_classifier(transformer_cfg(tiny_model_dir, action_decoder_num_heads=5), {"default": 6})


# ---------------------------------------------------------------------------------------------------
# action_cls_token_loss_weight

def count_lm_head_rows(model):
    """A forward hook on lm_head that records how many positions each call sees."""
    rows = []
    model.vlm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    return rows


def reference_answer_loss(model, processor, items):
    """The LM loss of a plain Qwen2_5_VLForConditionalGeneration forward, vlm(**inputs, labels=...),
    on each whole conversation (the processor's own tokens, nothing cut), labels -100 except the
    assistant turn's tokens (found by running the processor on the prompt alone); one sample at a
    time, combined as the token-weighted mean a batched forward computes."""
    from transformers.video_utils import VideoMetadata

    table = model.backbone.get_input_embeddings().weight
    with torch.no_grad():
        saved_row = table[model.act_token_id].clone()
        table[model.act_token_id] = model.act_embedding  # a full model keeps <ACT> in its table
    total, count = 0.0, 0
    try:
        for it in items:
            messages = prompt_messages(it.sample.messages)
            metadata = VideoMetadata(total_num_frames=it.info.num_frames, fps=it.info.fps,
                                     frames_indices=it.indices.tolist())
            kwargs = dict(videos=[it.frames], video_metadata=[metadata], do_resize=False, return_tensors="pt")
            full = processor(text=[processor.apply_chat_template(messages, tokenize=False)], **kwargs)
            prompt = processor(text=[processor.apply_chat_template(messages[:-1], tokenize=False,
                                                                   add_generation_prompt=True)], **kwargs)
            start = prompt["input_ids"].shape[1]
            assert torch.equal(full["input_ids"][:, :start], prompt["input_ids"])
            labels = torch.full_like(full["input_ids"], -100)
            labels[:, start:] = full["input_ids"][:, start:]
            n = int((labels[:, 1:] != -100).sum())
            total += model.vlm(**full, labels=labels).loss.item() * n
            count += n
    finally:
        with torch.no_grad():
            table[model.act_token_id] = saved_row
    return total / count


def test_token_loss_equals_full_forward_lm_loss(tiny_model_dir, synthetic_dir):
    processor, model = build_classifier(make_cfg(tiny_model_dir, action_cls_token_loss_weight=0.1), {"default": 6})
    perturb_adapters(model)
    model.eval()
    items = items_of(synthetic_dir, [0, 1, 2], MESSAGES, keep_frames=[None, 2, None])
    batch = Collator(processor, model.act_token_id, answer_tokens=True)(items)
    inputs = batch.inputs
    # the answer ends each row: "<ACT>." and the end of turn follow <ACT>, nothing after the turn
    lengths = inputs["attention_mask"].sum(1)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (inputs["input_ids"][torch.arange(3), lengths - 2] == im_end).all()
    assert inputs["answer_mask"].sum().item() == sum(
        len(processor.tokenizer(m[-1]["content"] + "<|im_end|>\n")["input_ids"]) for m in MESSAGES)

    rows = count_lm_head_rows(model)
    with torch.no_grad():
        logits, lm_loss = model("default", **inputs)
        reference = reference_answer_loss(model, processor, items)
    assert rows[0] == (inputs["answer_mask"].sum().item(),), "lm_head must see the answer's positions only"
    assert lm_loss.item() == pytest.approx(reference, rel=1e-5)
    # the tokens after <ACT> cannot change its state: the logits are those of the input cut at <ACT>
    with torch.no_grad():
        cut = model("default", **Collator(processor, model.act_token_id)(items).inputs)
    torch.testing.assert_close(logits, cut, atol=1e-5, rtol=1e-5)


def test_token_loss_weight_zero_changes_nothing(tiny_model_dir, synthetic_dir, base_args, tmp_path):
    """Weight 0 (the default): the text stops at <ACT>, no answer_mask, no lm_head call; > 0: the
    training run's loss includes the LM term and the tokens it needs."""
    import train

    processor, model = build_classifier(make_cfg(tiny_model_dir), {"default": 6})
    items = items_of(synthetic_dir, [0, 1], MESSAGES[:2])
    inputs = Collator(processor, model.act_token_id)(items).inputs
    assert "answer_mask" not in inputs
    lengths = inputs["attention_mask"].sum(1)
    assert (inputs["input_ids"][torch.arange(2), lengths - 1] == model.act_token_id).all()  # cut right after <ACT>
    longer = Collator(processor, model.act_token_id, answer_tokens=True)(items).inputs["attention_mask"].sum(1)
    assert (longer > lengths).all()
    rows = count_lm_head_rows(model)
    with torch.no_grad():
        assert isinstance(model("default", **inputs), torch.Tensor)
    assert rows == []

    # the same two training steps with and without the LM term: same data, different updates
    def run(weight, out):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--action_decoder_type", "transformer",
                                "--action_decoder_num_heads", "4", "--action_cls_token_loss_weight", str(weight),
                                "--output_dir", str(tmp_path / out)])
        with open(tmp_path / out / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]
    plain, with_lm = run(0.0, "plain"), run(0.5, "lm")
    assert plain[0] == pytest.approx(with_lm[0], rel=1e-4)  # step 1 logs the CE of the same start
    assert plain[1] != pytest.approx(with_lm[1], rel=1e-4)  # the LM term changed the first update

"""Memory features: gradient checkpointing (in-process and under DDP), bf16, attention
implementations, and length-grouped batches."""

import dataclasses
import types
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from batch_plan import StepLayout, train_batches
from data import Collator, VideoDataset, load_samples, sample_lengths
from loaders import batch_stream
from losses import LossSettings
from model import build_classifier, build_optimizer
from prepare.synthetic import main as make_synthetic
from config import Config
from video import VideoSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = VideoSettings(video_fps=4, video_maxlen=8, video_num_frames=None, video_min_pixels=3136,
                         video_max_pixels=3136)
CPU = torch.device("cpu")


def make_cfg(tiny_model_dir, **overrides):
    # adapters on the vision blocks too, so checkpointing covers both towers
    cfg = Config(model_name_or_path=tiny_model_dir, num_action_classes=6, lora_rank=4, lora_alpha=8, use_dora=True,
                 freeze_vision_tower=False, learning_rate=1e-2)
    return dataclasses.replace(cfg, **overrides)


def build(cfg, like=None):
    """A classifier for cfg; `like`: copy its trainable values, so two builds differ only in cfg.
    Otherwise LoRA B (zero at init) and the <ACT> row are perturbed so gradients reach everything."""
    processor, model = build_classifier(cfg, {"default": 6})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        if like is not None:
            source = dict(like.named_parameters())
            for n, p in trainable.items():
                p.copy_(source[n])
        else:
            g = torch.Generator().manual_seed(0)
            for n, p in trainable.items():
                if "lora_B" in n or n == "act_embedding":
                    p.add_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in n else 1.0))
    return processor, model


def make_batch(synthetic_dir, processor, model, indices, question_lengths=None):
    samples, _ = load_samples(os.path.join(synthetic_dir, "train.jsonl"), None, 6)
    if question_lengths is not None:  # different prompt lengths: the batch needs padding
        for i, n in zip(indices, question_lengths):
            samples[i] = dataclasses.replace(samples[i], messages=[
                {"role": "user", "content": "<video>" + " ".join(["Which action is it?"] * n)},
                {"role": "assistant", "content": "It is <ACT>."}])
    dataset = VideoDataset(samples, SETTINGS)
    return Collator(processor, model.act_token_id)([dataset[(i, 0, False)] for i in indices])


# ---------------------------------------------------------------------------------------------------
# Gradient checkpointing

def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, synthetic_dir):
    """One forward/backward with and without checkpointing (non-reentrant, LoRA/DoRA on both towers,
    adapter dropout on): identical gradients, and the layers really are recomputed."""
    grads, calls, reference = {}, {}, None
    for gc in (False, True):
        processor, model = build(make_cfg(tiny_model_dir, gradient_checkpointing=gc, lora_dropout=0.1), reference)
        reference = reference if reference is not None else model
        model.train()
        counted = []
        # a pre-hook: checkpointing's recompute stops early (inside the mlp) once it has what backward needs
        model.backbone.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: counted.append(1))
        batch = make_batch(synthetic_dir, processor, model, [0, 1, 2], question_lengths=[1, 3, 2])
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG state)
        F.cross_entropy(model("default", **batch.inputs), batch.labels).backward()
        grads[gc] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        calls[gc] = len(counted)
    assert calls == {False: 1, True: 2}, "with checkpointing the layer must run again in backward"
    assert grads[True].keys() == grads[False].keys()
    assert any(".visual.blocks." in n for n in grads[True]) and all(g.abs().sum() > 0 for g in grads[True].values())
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# bf16 and attention implementations

def test_bf16_step_close_to_fp32_with_fp32_head_and_optimizer_state(tiny_model_dir, synthetic_dir):
    cfgs = {bf16: make_cfg(tiny_model_dir, bf16=bf16) for bf16 in (False, True)}
    processor, fp32_model = build(cfgs[False])
    models = {False: fp32_model, True: build(cfgs[True], like=fp32_model)[1]}  # same values, before any step
    batch = make_batch(synthetic_dir, processor, fp32_model, [0, 1, 2, 3])
    losses = {}
    for bf16, model in models.items():
        optimizer = build_optimizer(model, cfgs[bf16])
        # what a micro-step reads of the run
        run = types.SimpleNamespace(wrapped=model, cfg=cfgs[bf16], device=CPU, losses={"default": LossSettings()})
        losses[bf16] = train.train_micro_step(run, batch).loss
        optimizer.step()
    # the frozen base really is bf16 ...
    assert model.backbone.language_model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    # ... while everything that trains, the head included, and all of AdamW's state stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.heads.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert len(states) == 2 * sum(1 for p in model.parameters() if p.requires_grad)  # exp_avg, exp_avg_sq
    assert all(v.dtype == torch.float32 for v in states)
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_sdpa_and_eager_attention_give_the_same_logits(tiny_model_dir, synthetic_dir):
    logits, reference = {}, None
    for impl in ("sdpa", "eager"):
        processor, model = build(make_cfg(tiny_model_dir, attn_implementation=impl), reference)
        reference = reference if reference is not None else model
        assert model.backbone.config._attn_implementation == impl
        assert model.backbone.visual.config._attn_implementation == impl
        model.eval()
        batch = make_batch(synthetic_dir, processor, model, [0, 1, 2], question_lengths=[1, 4, 2])
        assert (batch.inputs["attention_mask"] == 0).any(), "the batch should need padding"
        with torch.no_grad():
            logits[impl] = model("default", **batch.inputs)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Length grouping

def padding_fraction(batches, lengths):
    slots = sum(len(b) * max(lengths[j] for j, _, _ in b) for b in batches)
    return 1 - sum(lengths[j] for b in batches for j, _, _ in b) / slots


def test_length_grouping_cuts_padding_keeps_every_sample_once_and_one_label_space():
    rng = np.random.default_rng(0)
    sizes = [96, 64]  # two datasets (two label spaces), both multiples of one step's 8 samples
    lengths = rng.choice([60, 120, 240, 480], size=sum(sizes)) + rng.integers(0, 10, sum(sizes))
    space_of = np.repeat([0, 1], sizes)
    world, batch, accumulation = 2, 2, 2
    epochs = []
    for epoch in (0, 1):
        plain = [train_batches(sizes, [1, 1], StepLayout(batch, accumulation, world, r), epoch, 7) for r in range(world)]
        grouped = [train_batches(sizes, [1, 1], StepLayout(batch, accumulation, world, r), epoch, 7, lengths)
                   for r in range(world)]
        assert grouped == [train_batches(sizes, [1, 1], StepLayout(batch, accumulation, world, r), epoch, 7, lengths)
                           for r in range(world)], "deterministic in (seed, epoch): resume needs it"
        epochs.append(grouped)
        seen = sorted(j for rank in grouped for b in rank for j, _, _ in b)
        assert seen == list(range(sum(sizes))), "every sample exactly once per epoch"
        assert all(len({space_of[j] for j, _, _ in b}) == 1 for rank in grouped for b in rank)
        assert all(len(b) == batch for rank in grouped for b in rank)
        before = padding_fraction([b for rank in plain for b in rank], lengths)
        after = padding_fraction([b for rank in grouped for b in rank], lengths)
        assert after < 0.5 * before, (before, after)
        # same samples per optimizer step whatever the split into batch x accumulation x world
        as_one = train_batches(sizes, [1, 1], StepLayout(8, 1, 1, 0), epoch, 7, lengths)
        steps = [sorted(j for r in range(world) for b in grouped[r][s * accumulation:(s + 1) * accumulation]
                        for j, _, _ in b) for s in range(len(as_one))]
        assert steps == [sorted(j for j, _, _ in b) for b in as_one]
    assert epochs[0] != epochs[1], "each epoch is shuffled anew"


@pytest.fixture(scope="module")
def mixed_length_set(tmp_path_factory):
    """12 clips of 8, 16 and 32 frames (1, 2, 4 s at 8 fps), interleaved, paths absolute."""
    root = tmp_path_factory.mktemp("mixed")
    records = []
    for frames in (8, 16, 32):
        out = root / f"f{frames}"
        make_synthetic(["--out", str(out), "--train", "4", "--val", "1", "--size", "56", "--frames", str(frames),
                        "--fps", "8", "--workers", "1", "--seed", str(frames)])
        for line in (out / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["videos"] = [str(out / record["videos"][0])]
            records.append(record)
    order = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
    return str(root / "train.jsonl")


def test_group_by_length_through_batch_stream(mixed_length_set, tiny_model_dir, tmp_path):
    """The config key end to end: sample_lengths counts exactly the video tokens the processor emits,
    and one epoch of real collated batches carries less padding with group_by_length on."""
    from model import load_processor, vision_geometry

    cfg = make_cfg(tiny_model_dir, video_fps=8, video_maxlen=32, video_min_pixels=3136, video_max_pixels=3136,
                   per_device_train_batch_size=2, train_datasets=[{"path": mixed_length_set}], seed=3,
                   dataloader_num_workers=0)
    processor, act_id = load_processor(tiny_model_dir)
    mix = train.load_mix(cfg, cfg.train_datasets, vision_geometry(processor))
    dataset = mix.dataset
    collate = Collator(processor, act_id)
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    lengths = sample_lengths(dataset)
    assert sorted(set(lengths.tolist())) == [16, 32, 64]  # 8/16/32 frames x 4 tokens per frame pair

    padding = {}
    for grouped in (False, True):
        stream = batch_stream(mix, collate, dataclasses.replace(cfg, group_by_length=grouped), StepLayout(2, 1, 1, 0),
                              (0, 0))
        pad = slots = 0
        seen = []
        per_epoch = len(dataset) // 2
        for step in range(per_epoch):  # one epoch; the stream reports where the next batch comes from
            epoch, position, batch = next(stream)
            assert (epoch, position) == ((0, step + 1) if step < per_epoch - 1 else (1, 0))
            ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
            for row, j in enumerate(batch.index.tolist()):
                assert (ids[row] == video_pad).sum().item() == lengths[j]
            seen += batch.index.tolist()
            pad, slots = pad + (mask == 0).sum().item(), slots + mask.numel()
        assert sorted(seen) == list(range(len(dataset)))
        padding[grouped] = pad / slots
    print(f"padding fraction on 8/16/32-frame clips, batch 2: {padding[False]:.3f} -> {padding[True]:.3f}")
    assert padding[True] < 0.5 * padding[False]

"""The Qwen-VL families behind one classifier: what differs between them (frame geometry, frame
times, vocabulary), and the whole train -> checkpoint -> resume -> eval -> predict path, per family.
The tests that define the <ACT> hidden state, what trains and save/load run per family in
test_model.py (the `family_model_dir` fixture)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from config import Config
from data import Collator, Sample, VideoDataset, load_samples, sample_lengths, video_text_per_group
from inference import VideoClassifier
from checkpoint import CheckpointError, base_model_fingerprint, check_base_model
from model import ACT_TOKEN, load_processor, vision_geometry
from prepare.synthetic import textured_clip, write_video
from prepare.tiny_model import FAMILIES
from video import VideoInfo, VideoSettings, frame_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_TIMESTAMPS = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # "<1.3 seconds>" before each patch


def write_clip(path, num_frames, fps, height, width):
    write_video(path, textured_clip(np.random.default_rng(0), num_frames, height, width), fps)
    return path


def model_type(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["model_type"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The same 4 s of motion at two native frame rates."""
    folder = tmp_path_factory.mktemp("clips")
    return {25: write_clip(str(folder / "clip25.avi"), 100, 25, 120, 160),
            12: write_clip(str(folder / "clip12.webm"), 48, 12, 120, 160)}


def collated(processor, act_id, path, video_fps):
    sample = Sample(path, [{"role": "user", "content": "<video>What is happening?"},
                           {"role": "assistant", "content": f"It is {ACT_TOKEN}."}], 0, "default", "test:1")
    settings = VideoSettings(video_fps, 128, None, 3136, 3136, **vision_geometry(processor))
    item = VideoDataset([sample], settings)[(0, 0, False)]
    return item, Collator(processor, act_id)([item]).inputs


@pytest.mark.parametrize("video_fps", [1.0, 2.0])
def test_frame_times_are_the_real_times_of_the_sampled_frames(family_model_dir, clips, video_fps):
    processor, act_id = load_processor(family_model_dir)
    family = model_type(family_model_dir)
    for native_fps, path in clips.items():
        item, inputs = collated(processor, act_id, path, video_fps)
        assert len(item.indices) == 4 * video_fps  # 4 s at video_fps
        text = processor.tokenizer.decode(inputs["input_ids"][0])
        stamps = re.findall(r"<([0-9.]+) seconds>", text)
        if family in TEXT_TIMESTAMPS:
            # the mean time of each temporal patch's frames, as the processor formats it
            times = item.indices.reshape(-1, 2).mean(1) / native_fps
            assert stamps == [f"{t:.1f}" for t in times]
            assert float(stamps[1]) - float(stamps[0]) == pytest.approx(2 / video_fps, abs=0.15)
        elif "second_per_grid_ts" in inputs:  # Qwen2.5-VL: real time in the M-RoPE positions
            assert stamps == []
            assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / video_fps])
        else:  # Qwen2-VL: temporal positions count patches; the model has no notion of seconds
            assert family == "qwen2_vl" and stamps == []


def test_frames_are_scaled_as_the_processor_scales_them(family_model_dir):
    """Our early scaling (video.frame_size, in the decoder) and the family's own video processor,
    resizing full-size frames, agree on the frame size. Qwen2/2.5-VL's budget is per frame;
    Qwen3-VL/3.5's is per clip (frames x pixels), so it gets the clip's share."""
    processor, _ = load_processor(family_model_dir)
    geometry = vision_geometry(processor)
    video = processor.video_processor
    per_clip = model_type(family_model_dir) in TEXT_TIMESTAMPS
    frames = np.random.default_rng(0).integers(0, 255, (4, 130, 190, 3), dtype=np.uint8)
    for min_pixels, max_pixels in [(3136, 12544), (3136, 4096), (32 * 32, 200 * 200), (120 * 170, 160 * 224)]:
        ours = frame_size(VideoInfo(4, 25.0, 190, 130), min_pixels, max_pixels, geometry["resize_factor"])
        scale = 4 if per_clip else 1
        out = video(videos=[frames], do_resize=True, do_sample_frames=False, return_tensors="pt",
                    size={"shortest_edge": min_pixels * scale, "longest_edge": max_pixels * scale})
        t, h, w = out["video_grid_thw"][0].tolist()
        assert (h * video.patch_size, w * video.patch_size) == ours, (min_pixels, max_pixels)


def test_token_estimate_counts_the_video_tokens_the_processor_writes(family_model_dir, clips):
    """group_by_length's estimate (data.sample_lengths, from a probe, no decoding) equals the tokens
    between the video's outer vision start/end: <|video_pad|> tokens, and for Qwen3-VL/3.5 also each
    temporal patch's "<t seconds>" text and its own vision start/end."""
    processor, act_id = load_processor(family_model_dir)
    tokenizer = processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    per_group = video_text_per_group(processor, act_id)
    assert (per_group > 0) == (model_type(family_model_dir) in TEXT_TIMESTAMPS)
    for video_fps in (1.0, 2.0):
        item, inputs = collated(processor, act_id, clips[25], video_fps)
        ids = inputs["input_ids"][0].tolist()
        first, last = ids.index(start), len(ids) - 1 - ids[::-1].index(end)
        sample = item.sample
        settings = VideoSettings(video_fps, 128, None, 3136, 3136, **vision_geometry(processor))
        estimate = sample_lengths(VideoDataset([sample], settings), per_group)
        assert estimate.tolist() == [last - first - 1]


def test_act_token_lands_on_a_spare_row(family_model_dir):
    """<ACT> gets a new id past the tokenizer's, inside the embedding table (151,936 rows for
    Qwen2/2.5/3-VL, 248,320 for Qwen3.5): no resize, the table keeps its shape."""
    from transformers import AutoConfig

    processor, act_id = load_processor(family_model_dir)
    rows = AutoConfig.from_pretrained(family_model_dir).get_text_config().vocab_size
    assert act_id == len(processor.tokenizer) - 1
    assert act_id < rows == (248320 if model_type(family_model_dir).startswith("qwen3_5") else 151936)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_5_vl"])  # test_bad_input: same family
def test_a_checkpoint_only_loads_onto_its_own_family(tmp_path, tiny_model_dir, tiny_family_model_dir, family):
    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / "trainer_state.json", "w") as f:
        trained_on = Config(model_name_or_path=tiny_family_model_dir(family))
        json.dump({"step": 1, "base_model": base_model_fingerprint(trained_on)}, f)
    with pytest.raises(CheckpointError, match=f"trained on a {family} model .* is a qwen2_5_vl model"):
        check_base_model(str(tmp_path / "ckpt"), Config(model_name_or_path=tiny_model_dir))


def train_log(output_dir, split):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["split"] == split]


def trained_weights(checkpoint):
    weights = load_file(os.path.join(checkpoint, "trainable.safetensors"))
    head = load_file(os.path.join(checkpoint, "heads", "default", "action_decoder.safetensors"))
    return {**weights, **{f"head.{k}": v for k, v in head.items()}}


def test_train_resume_eval_predict(family_model_dir, synthetic_dir, tmp_path):
    """2 steps straight vs 1 + a resume from step 1's checkpoint in a fresh folder: the same losses
    and bit-identical weights; the end-of-run evaluation and predict.py's VideoClassifier agree on
    top-1 over the same validation clips."""
    args = ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", family_model_dir,
            "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]",
            "--eval_datasets", f"[{{path: {synthetic_dir}/val.jsonl}}]",
            "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--video_maxlen", "4",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "6", "--lora_dropout", "0.1",
            "--dataloader_num_workers", "0", "--logging_steps", "1", "--eval_steps", "0", "--max_steps", "2",
            "--save_steps", "1", "--save_total_limit", "5"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main(args + ["--output_dir", straight])
    step1 = os.path.join(straight, "checkpoints", "step_0000001")
    shutil.copytree(step1, os.path.join(resumed, "checkpoints", "step_0000001"))
    train.main(args + ["--output_dir", resumed, "--resume", "auto", "--eval_datasets", "[]"])

    assert [m["loss"] for m in train_log(resumed, "train")] == [m["loss"] for m in train_log(straight, "train")][1:]
    final = trained_weights(os.path.join(straight, "checkpoints", "step_0000002"))
    again = trained_weights(os.path.join(resumed, "checkpoints", "step_0000002"))
    assert final.keys() == again.keys()
    for name in final:
        assert torch.equal(final[name], again[name]), f"{name} differs after resume"

    evaluation = train_log(straight, "val")[-1]
    samples, _ = load_samples(os.path.join(synthetic_dir, "val.jsonl"), None, 6)
    classifier = VideoClassifier.from_pretrained(os.path.join(straight, "checkpoints", "step_0000002"), "cpu")
    predictions = classifier.predict([s.video for s in samples], top_k=1)
    names = json.load(open(os.path.join(synthetic_dir, "classes.json")))
    correct = [p["top"][0][0] == names[s.label] for p, s in zip(predictions, samples)]
    assert evaluation["top1"] == pytest.approx(sum(correct) / len(samples))

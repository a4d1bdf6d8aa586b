"""Records -> validated samples -> sampled, decoded, resized frames -> model-ready batches.

Record format (LLaMA-Factory sharegpt, a .json array or .jsonl lines):
    {"messages": [{"role": "user", "content": "<video>What action is being performed in this video?"},
                  {"role": "assistant", "content": "The action being performed is <ACT>."}],
     "videos": ["UCF101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"], "action_label": 0}
A relative video path resolves against the dataset's `video_root`, else the record file's folder.
"""

import json
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from model import ACT_TOKEN

VIDEO_TOKEN = "<video>"


# ---------------------------------------------------------------------------------------------------
# Records

@dataclass
class Sample:
    video: str  # absolute path
    messages: list  # [{"role", "content"}], content with <video> and <ACT> placeholders
    label: int | None
    label_space: str
    source: str  # "file:line" for error messages


class DataError(ValueError):
    pass


def read_records(path):
    """Yields (line_number, record). `.jsonl`: one object a line; `.json`: an array (line numbers
    are then the record's index + 1, since json does not keep positions)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file not found (check `path` in train_datasets/eval_datasets)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: dataset file is empty")
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); use a JSON array or .jsonl lines") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
        yield from enumerate(records, 1)


def record_problems(record, num_classes, require_label):
    """Everything wrong with one record, as short phrases (empty list: the record is fine)."""
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected an object"]
    problems = []
    messages, videos = record.get("messages"), record.get("videos")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        problems.append("`messages` must be a list of {role, content} objects")
        messages = []
    user = "".join(m["content"] for m in messages if m.get("role") == "user")
    assistant = "".join(m["content"] for m in messages if m.get("role") == "assistant")
    if user.count(VIDEO_TOKEN) != 1:
        problems.append(f"the user turn must contain {VIDEO_TOKEN} exactly once (found {user.count(VIDEO_TOKEN)})")
    if assistant.count(ACT_TOKEN) != 1:
        problems.append(f"the assistant turn must contain {ACT_TOKEN} exactly once (found {assistant.count(ACT_TOKEN)})")
    if not (isinstance(videos, list) and len(videos) == 1 and isinstance(videos[0], str)):
        problems.append("`videos` must be a list with exactly one path")
    label = record.get("action_label")
    if label is None:
        if require_label:
            problems.append("`action_label` is missing")
    elif isinstance(label, bool) or not isinstance(label, int):
        problems.append(f"`action_label` must be an int, got {label!r}")
    elif not 0 <= label < num_classes:
        problems.append(f"`action_label` {label} is outside [0, {num_classes}) (num_action_classes={num_classes})")
    return problems


def resolve_video(path, video_root, record_file):
    if os.path.isabs(path):
        return path
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(record_file))
    return os.path.join(root, path)


def load_samples(path, video_root, num_classes, label_space="default", require_label=True, max_report=20):
    """Reads and validates a whole dataset file up front, so a bad record fails the run before any
    GPU time is spent. All problems are collected and reported together, with file:line."""
    samples, problems = [], []
    for lineno, record in read_records(path):
        where = f"{path}:{lineno}"
        found = record_problems(record, num_classes, require_label)
        if not found:
            video = resolve_video(record["videos"][0], video_root, path)
            if not os.path.isfile(video):
                found.append(f"video {video} not found (set `video_root` to the folder the paths are relative to)")
            else:
                samples.append(Sample(video, record["messages"], record.get("action_label"), label_space, where))
        problems += [f"{where}: {p}" for p in found]
    if problems:
        more = f"\n... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:max_report]) + more)
    if not samples:
        raise DataError(f"{path}: no records")
    return samples


# ---------------------------------------------------------------------------------------------------
# Video: probe, choose frame indices, decode exactly those frames

@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def probe_video(path):
    """Frame count, frame rate and size. WebM/MKV report 0 frames and no duration in PyAV, so the
    count then comes from demuxing the packets (no decoding)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        num_frames = stream.frames
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        return VideoInfo(num_frames, fps, stream.codec_context.width, stream.codec_context.height)


def decode_frames(path, indices, size=None):
    """Frames at the given 0-based presentation-order indices (any order, repeats allowed) as a
    (T, H, W, 3) uint8 RGB array. `size=(height, width)` scales in FFmpeg's scaler while converting,
    so full-size RGB frames never exist."""
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    frames = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                height, width = size if size is not None else (frame.height, frame.width)
                frames[index] = frame.reformat(width=width, height=height, format="rgb24",
                                               interpolation="BICUBIC").to_ndarray()
            if index >= last:
                break
    missing = sorted(wanted - set(frames))
    if missing:
        raise DataError(f"{path}: has fewer frames than requested (no frame {missing[0]}; "
                        f"decoded {index + 1 if frames or missing else 0})")
    return np.stack([frames[int(i)] for i in indices])


def num_frames_to_sample(info, video_fps, video_maxlen, video_num_frames):
    """LLaMA-Factory's rule (min(maxlen, duration * fps)) or a fixed count; always even and >= 2,
    because Qwen2.5-VL patches time in pairs."""
    if video_num_frames is not None:
        n = video_num_frames
    else:
        n = min(video_maxlen, math.floor(info.num_frames / info.fps * video_fps))
    return max(2, n - n % 2)


def sample_indices(num_frames, n, rng=None):
    """TSN segment sampling: split the clip into n equal segments and take one frame from each, at a
    random offset (training, rng given) or the segment centre (evaluation, rng None). A clip shorter
    than n frames repeats frames rather than failing."""
    edges = np.linspace(0, num_frames, n + 1)
    if rng is None:
        points = (edges[:-1] + edges[1:]) / 2
    else:
        points = edges[:-1] + rng.random(n) * (edges[1:] - edges[:-1])
    return np.clip(np.floor(points).astype(np.int64), 0, num_frames - 1)


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """Qwen2-VL's resize rule: sides multiples of `factor` (28), area within [min_pixels, max_pixels],
    aspect ratio kept."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------------------------------------------
# Dataset and batches

@dataclass
class VideoSettings:
    video_fps: float
    video_maxlen: int
    video_num_frames: int | None
    video_min_pixels: int
    video_max_pixels: int


class VideoDataset(torch.utils.data.Dataset):
    """Items are addressed as (index, epoch, train): the random frame offsets come from a generator
    seeded by (seed, epoch, index), so they do not depend on workers and resume exactly."""

    def __init__(self, samples, settings, seed=0):
        self.samples, self.settings, self.seed = samples, settings, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, train = key
        sample, s = self.samples[index], self.settings
        info = probe_video(sample.video)
        n = num_frames_to_sample(info, s.video_fps, s.video_maxlen, s.video_num_frames)
        rng = np.random.default_rng([self.seed, epoch, index]) if train else None
        indices = sample_indices(info.num_frames, n, rng)
        size = smart_resize(info.height, info.width, 28, s.video_min_pixels, s.video_max_pixels)
        frames = decode_frames(sample.video, indices, size)
        return {"frames": frames, "indices": indices, "info": info, "sample": sample, "index": index}


def prompt_messages(messages):
    """sharegpt messages -> chat-template messages, the <video> placeholder as a video item."""
    out = []
    for m in messages:
        content = m["content"]
        if VIDEO_TOKEN in content:
            before, after = content.split(VIDEO_TOKEN, 1)
            content = [{"type": "text", "text": before}] if before else []
            content += [{"type": "video"}] + ([{"type": "text", "text": after}] if after else [])
        out.append({"role": m["role"], "content": content})
    return out


def prompt_text(processor, messages):
    """The chat-formatted conversation cut right after <ACT>: causal attention means nothing after
    it can change its hidden state, so those tokens are pure cost."""
    text = processor.apply_chat_template(prompt_messages(messages), tokenize=False)
    return text[: text.index(ACT_TOKEN) + len(ACT_TOKEN)]


class Collator:
    """Runs the processor on a list of dataset items (in DataLoader workers) and adds `act_index`,
    `labels` and `label_space`. A batch holds a single label space."""

    def __init__(self, processor, act_token_id):
        self.processor, self.act_token_id = processor, act_token_id

    def __call__(self, items):
        from transformers.video_utils import VideoMetadata

        spaces = {it["sample"].label_space for it in items}
        assert len(spaces) == 1, f"a batch mixes label spaces {spaces}"
        metadata = [VideoMetadata(total_num_frames=it["info"].num_frames, fps=it["info"].fps,
                                  frames_indices=it["indices"].tolist()) for it in items]
        batch = self.processor(
            text=[prompt_text(self.processor, it["sample"].messages) for it in items],
            videos=[it["frames"] for it in items], video_metadata=metadata, do_resize=False,
            do_sample_frames=False, padding=True, return_tensors="pt")
        is_act = batch["input_ids"] == self.act_token_id
        assert (is_act.sum(1) == 1).all(), "every row must hold exactly one <ACT>"
        labels = [it["sample"].label for it in items]
        return {
            "inputs": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "mm_token_type_ids": batch["mm_token_type_ids"],
                       "pixel_values_videos": batch["pixel_values_videos"],
                       "video_grid_thw": batch["video_grid_thw"],
                       "second_per_grid_ts": batch["second_per_grid_ts"],
                       "act_index": is_act.int().argmax(1)},
            "labels": torch.tensor([-100 if label is None else label for label in labels]),
            "label_space": spaces.pop(),
            "index": torch.tensor([it["index"] for it in items]),
        }


def train_batches(dataset_sizes, weights, batch_size, world_size, rank, epoch, seed):
    """This rank's batches for one epoch, as lists of (global_index, epoch, True) keys.

    The datasets are concatenated; each contributes round(weight * size) samples per epoch (drawn
    without replacement while it can, then again), shuffled with (seed, epoch). A global batch is
    world_size * batch_size samples from one dataset (one label space), so ranks step in lockstep and
    every micro-batch has the same size (exact gradient accumulation). Incomplete batches are dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    offsets = np.cumsum([0] + list(dataset_sizes))
    global_batches = []
    for d, (size, weight) in enumerate(zip(dataset_sizes, weights)):
        count = round(weight * size)
        order = np.concatenate([rng.permutation(size) for _ in range(math.ceil(count / size))])[:count]
        order = order + offsets[d]
        per_batch = batch_size * world_size
        global_batches += [order[i:i + per_batch] for i in range(0, count - per_batch + 1, per_batch)]
    global_batches = [global_batches[i] for i in rng.permutation(len(global_batches))]
    return [[(int(j), epoch, True) for j in b[rank * batch_size:(rank + 1) * batch_size]] for b in global_batches]


def eval_batches(num_samples, batch_size, world_size, rank):
    """Each sample exactly once across ranks (no padding duplicates, unlike DistributedSampler)."""
    mine = list(range(rank, num_samples, world_size))
    return [[(j, 0, False) for j in mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]

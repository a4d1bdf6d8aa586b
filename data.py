"""Records -> validated samples -> dataset items -> model-ready batches (the DataLoaders over them: loaders.py).

Record format (LLaMA-Factory sharegpt, a .json array or .jsonl lines):
    {"messages": [{"role": "user", "content": "<video>What action is being performed in this video?"},
                  {"role": "assistant", "content": "The action being performed is <ACT>."}],
     "videos": ["UCF101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"], "action_label": 0}
A relative video path resolves against the dataset's `video_root`, else the record file's folder.
The video may be a frame folder (a directory of images, one frame each); its frame rate is the
record's `fps`, else the dataset entry's `frame_fps`, and one of them must be given.
Frames come from video.py (sampling, exact decoding, scaling, the cache).
"""

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import CheckpointError
from chat import ACT_TOKEN, VIDEO_TOKEN, processor_inputs, prompt_messages, prompt_text
from config import ConfigError
from llamafactory import renamed_record
from model import vision_geometry
from video import (SINGLE_VIEW, DataError, VideoInfo, frame_files, frame_size, load_sampled, num_frames_to_sample,
                   probe_video)
from video import decode_frames  # noqa: F401  (data.decode_frames: the frame decoder, importable from here too)

# A user's mistake in a config, a dataset or a checkpoint: the scripts' main turns these into one message
# and exit code 1, without a traceback (tracebacks are for bugs).
USER_ERRORS = (ConfigError, DataError, CheckpointError)

MAX_REPORT = 20  # problems listed in one error; the rest are counted


# ---------------------------------------------------------------------------------------------------
# Records

@dataclass
class Sample:
    video: str  # absolute path
    messages: list  # [{"role", "content"}], content with <video> and <ACT> placeholders
    label: int | list | None  # a class index; a multi-label space's: the list of its positive classes
    label_space: str
    source: str  # "file:line" for error messages
    fps: float | None = None  # a frame folder's frame rate (a video file has its own)


@dataclass
class EntryRules:
    """How one dataset entry's records are read, beyond the file and its label space's size."""
    rename: object = None  # record -> record in this format (a registry's columns: llamafactory.renamed_record)
    frame_fps: float | None = None  # the entry's `frame_fps`: frame folders whose record has no `fps`
    multi_label: bool = False  # the entry's label space is multi-label: action_label lists its classes


@dataclass
class Reading:
    """What load_datasets asks of every entry's records."""
    require_label: bool = True  # training needs labels; prediction and some evaluations do not
    max_samples: int | None = None  # only each file's first N records (LLaMA-Factory's max_samples)
    multi_label: frozenset = frozenset()  # the label spaces declared multi-label (config.multi_label_spaces)


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
    except OSError as e:  # a folder, no read permission, an I/O error
        raise DataError(f"{path}: cannot read the dataset file ({e.strerror or e})") from None
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


def record_problems(record, num_classes, require_label, multi_label=False):
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
    else:
        problems += label_problems(label, num_classes, multi_label)
    fps = record.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        problems.append(f"`fps` must be a positive number (a frame folder's frame rate), got {fps!r}")
    return problems


def label_problems(label, num_classes, multi_label):
    """A single-label space takes a class index; a multi-label one a list of distinct class indices
    (an empty list: no action of the space happens) or one index."""
    if isinstance(label, list) and not multi_label:
        return [f"`action_label` is a list {label!r}, but this label space is single-label: declare it "
                f"multi-label (`multi_label: true` for the default space; label_spaces: {{NAME: {{num_classes: N, "
                f"multi_label: true}}}}), or give one class"]
    labels = label if isinstance(label, list) else [label]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in labels):
        return [f"`action_label` must be {'class indices' if multi_label else 'an int'}, got {label!r}"]
    outside = [x for x in labels if not 0 <= x < num_classes]
    if outside:
        return [f"`action_label` {outside[0]} is outside [0, {num_classes}) (num_action_classes={num_classes}, or the "
                f"label space's num_classes)"]
    if len(set(labels)) < len(labels):
        return [f"`action_label` {label!r} lists a class twice"]
    return []


def resolve_video(path, video_root, record_file):
    if os.path.isabs(path):
        return path
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(record_file))
    joined = os.path.join(root, path)
    if video_root is not None and not os.path.exists(joined) and os.path.isfile(path):
        return os.path.abspath(path)  # LLaMA-Factory's media_dir fallback: the path as written
    return joined


def load_samples(path, video_root, num_classes, label_space="default", require_label=True, max_samples=None,
                 rules=None):
    """Reads and validates a whole dataset file up front, so a bad record fails the run before any
    GPU time is spent. All problems are collected and reported together, with file:line.
    `max_samples`: only the file's first N records (LLaMA-Factory's max_samples), the rest unread.
    `rules`: the dataset entry's EntryRules (its column renaming, frame_fps).

    Returns (samples, bad_videos): records whose video file is missing or empty are not errors here
    but listed in bad_videos, so the caller can apply its tolerance (max_bad_video_fraction). A frame
    folder is listed (its frames checked for gaps) here; a folder with a problem is an error, since
    it is the extraction that needs redoing, not a download that can be tolerated."""
    rules = rules if rules is not None else EntryRules()
    samples, problems, bad_videos = [], [], []
    for lineno, record in itertools.islice(read_records(path), max_samples):
        where = f"{path}:{lineno}"
        if rules.rename is not None:
            record = rules.rename(record)
        found = record_problems(record, num_classes, require_label, rules.multi_label)
        problems += [f"{where}: {p}" for p in found]
        if found:
            continue
        video = resolve_video(record["videos"][0], video_root, path)
        label = record.get("action_label")
        if rules.multi_label and isinstance(label, int):
            record = {**record, "action_label": [label]}
        fps = record.get("fps") if record.get("fps") is not None else rules.frame_fps
        if os.path.isdir(video):
            found = frame_folder_problems(video, fps)
            problems += [f"{where}: {p}" for p in found]
            if not found:
                samples.append(Sample(video, record["messages"], record.get("action_label"), label_space, where, fps))
        elif not os.path.isfile(video):
            bad_videos.append(f"{where}: video {video} not found")
        elif os.path.getsize(video) == 0:
            bad_videos.append(f"{where}: video {video} is empty (0 bytes)")
        else:
            samples.append(Sample(video, record["messages"], record.get("action_label"), label_space, where))
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORT} more" if len(problems) > MAX_REPORT else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:MAX_REPORT]) + more)
    if not samples and not bad_videos:
        raise DataError(f"{path}: no records")
    return samples, bad_videos


def frame_folder_problems(folder, fps):
    """What stops a frame folder from being read: no frame rate (never guessed), no frames, a gap."""
    problems = []
    if fps is None:
        problems.append(f"video {folder} is a frame folder, which has no frame rate of its own: give it as "
                        f"`fps` in the record, or as `frame_fps` in the dataset entry")
    try:
        frame_files(folder)
    except DataError as e:
        problems.append(str(e))
    return problems


def check_bad_videos(bad_videos, total, max_fraction):
    """Fails when more than max_fraction of the samples have unusable videos (a wrong video_root
    makes them all missing); otherwise returns a warning listing them (or None)."""
    if not bad_videos:
        return None
    listing = "\n".join(bad_videos[:MAX_REPORT]) + (f"\n... and {len(bad_videos) - MAX_REPORT} more"
                                                    if len(bad_videos) > MAX_REPORT else "")
    summary = f"{len(bad_videos)} of {total} samples have unusable videos ({len(bad_videos) / total:.1%})"
    if len(bad_videos) > max_fraction * total:
        raise DataError(f"{summary}, more than max_bad_video_fraction={max_fraction}:\n{listing}\n"
                        f"Check `video_root` (relative paths resolve against it, else the record file's folder).")
    return f"skipping them: {summary}:\n{listing}"


# ---------------------------------------------------------------------------------------------------
# Dataset items and batches

@dataclass
class Item:
    """One view of one sample, as VideoDataset gives it to the Collator."""
    sample: Sample
    frames: np.ndarray  # (T, H, W, 3) uint8: the sampled frames, scaled and cropped to the view
    indices: np.ndarray  # (T,) their 0-based indices in the video
    info: VideoInfo  # the video's frame count, fps and size
    index: int  # the sample asked for (its position in the dataset)
    valid: bool  # False when another sample stood in for an unreadable video in evaluation
    skipped: list  # "file:line: why" of unreadable videos passed over to get here


@dataclass
class Batch:
    """What the Collator makes of a list of Items: one label space, the model's inputs and the rest."""
    inputs: dict  # model inputs: every tensor the processor returns, act_index (B,), answer_mask (B, L) if asked
    labels: torch.Tensor  # (B,) class index; -100 where nothing counts (no label, or a stand-in); multi-label:
    # (B, K) each row's positive classes padded with -1 (label_tensor)
    label_space: str  # which head the batch goes through
    index: torch.Tensor  # (B,) Item.index
    sources: list  # "file:line" of each record
    valid: torch.Tensor  # (B,) Item.valid
    skipped: list  # every Item's skipped messages


class VideoDataset(torch.utils.data.Dataset):
    """Items are addressed as (index, epoch, train, view): the random frame offsets come from a
    generator seeded by (seed, epoch, index), so they do not depend on workers and resume exactly;
    `view` picks one of the evaluation views (temporal clip x spatial crop).

    A video that cannot be read (truncated, not a video, fewer frames than its header says) does not
    stop the run: the next readable sample stands in, and the item lists what was skipped. In
    evaluation the stand-in is marked invalid, so it counts nowhere."""

    def __init__(self, samples, settings, seed=0):
        self.samples, self.settings, self.seed = samples, settings, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, train, view = key if len(key) == 4 else (*key, SINGLE_VIEW)
        skipped, space = [], self.samples[index].label_space
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self.samples[i].label_space != space:  # a batch holds one label space
                continue
            rng = np.random.default_rng([self.seed, epoch, i]) if train else None
            try:
                info, indices, frames = load_sampled(self.samples[i].video, self.settings, rng, view,
                                                     self.samples[i].fps)
            except DataError as e:
                skipped.append(f"{self.samples[i].source}: {e}")
                continue
            return Item(self.samples[i], frames, indices, info, index, train or i == index, skipped)
        raise DataError(f"no readable video among {len(self.samples)} samples:\n" + "\n".join(skipped[:20]))


def answer_turn(processor, messages):
    """(prompt, answer): the chat-formatted conversation up to the assistant turn that holds <ACT>
    (generation prompt included), and that turn as the template renders it (content and end of
    turn: what LLaMA-Factory's SFT labels cover). Turns after it are left out."""
    last = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and ACT_TOKEN in m["content"])
    prompt = processor.apply_chat_template(prompt_messages(messages[:last]), tokenize=False,
                                           add_generation_prompt=True)
    text = processor.apply_chat_template(prompt_messages(messages[:last + 1]), tokenize=False)
    if not text.startswith(prompt):
        raise DataError("the chat template renders the conversation without the generation prompt as its "
                        "prefix; action_cls_token_loss_weight > 0 cannot find the answer's tokens")
    return prompt, text[len(prompt):]


def answer_token_count(tokenizer, prompt, answer, source):
    """How many tokens the answer adds after the prompt (the video placeholder expands inside the
    prompt, so this count holds for the processor's tokens too)."""
    prompt_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(prompt + answer)["input_ids"]
    if ids[:len(prompt_ids)] != prompt_ids:  # a merge across the boundary would blur the answer's start
        raise DataError(f"{source}: the prompt's tokens change when the answer follows them; "
                        f"action_cls_token_loss_weight > 0 cannot find the answer's tokens")
    return len(ids) - len(prompt_ids)


class Collator:
    """Runs the processor on a list of dataset items (in DataLoader workers) and adds `act_index`,
    `labels` and `label_space`. A batch holds a single label space.

    answer_tokens (action_cls_token_loss_weight > 0): the text runs to the end of the answer
    instead of stopping at <ACT>, and `answer_mask` (B, L) marks the answer's tokens, the LM loss's
    targets."""

    def __init__(self, processor, act_token_id, answer_tokens=False):
        self.processor, self.act_token_id, self.answer_tokens = processor, act_token_id, answer_tokens

    def __call__(self, items):
        spaces = {it.sample.label_space for it in items}
        if len(spaces) != 1:  # the batch plans never do this; a caller's own batches might
            raise ValueError(f"a batch mixes label spaces {sorted(spaces)}; batch each label space on its own")
        if self.answer_tokens:
            turns = [answer_turn(self.processor, it.sample.messages) for it in items]
            texts = [prompt + answer for prompt, answer in turns]
        else:
            texts = [prompt_text(self.processor, it.sample.messages) for it in items]
        batch = processor_inputs(self.processor, texts, [(it.frames, it.indices, it.info) for it in items])
        is_act = batch["input_ids"] == self.act_token_id
        if not (is_act.sum(1) == 1).all():
            bad = [it.sample.source for it, n in zip(items, is_act.sum(1).tolist()) if n != 1]
            raise DataError(f"{bad}: the tokenized prompt must hold exactly one <ACT> token; check that the "
                            f"records' text has no other {ACT_TOKEN} and the chat template keeps it")
        labels = [it.sample.label if it.valid else None for it in items]
        # Every tensor the family's processor returns goes to its forward: input_ids, attention_mask,
        # pixel_values_videos, video_grid_thw, mm_token_type_ids (M-RoPE), and Qwen2.5-VL's
        # second_per_grid_ts; Qwen3-VL and Qwen3.5 put the frame times into the text instead.
        inputs = {key: value for key, value in batch.items() if torch.is_tensor(value)}
        inputs["act_index"] = is_act.int().argmax(1)
        if self.answer_tokens:
            counts = [answer_token_count(self.processor.tokenizer, prompt, answer, it.sample.source)
                      for (prompt, answer), it in zip(turns, items)]
            inputs["answer_mask"] = answer_mask(batch["attention_mask"], torch.tensor(counts))
        return Batch(inputs, label_tensor(labels), spaces.pop(),
                     torch.tensor([it.index for it in items]), [it.sample.source for it in items],
                     torch.tensor([it.valid for it in items]), [msg for it in items for msg in it.skipped])


def label_tensor(labels):
    """Sample labels (None: nothing counts) -> (B,) class indices, -100 for None; or, when any label is
    a list (a multi-label space), (B, K) rows of positive classes padded with -1, -100 rows for None."""
    if not any(isinstance(label, list) for label in labels):
        return torch.tensor([-100 if label is None else label for label in labels])
    width = max([1] + [len(label) for label in labels if label is not None])
    return torch.tensor([[-100] * width if label is None else label + [-1] * (width - len(label)) for label in labels])


def answer_mask(attention_mask, counts):
    """(B, L) True at each row's last counts[i] real tokens: the answer, which ends the text. Rows
    are padded on the right (load_processor)."""
    lengths = attention_mask.sum(1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1])
    return (positions >= lengths - counts[:, None]) & (positions < lengths)


def sample_lengths(dataset, text_per_group=0):
    """Each sample's video token count, from a probe of the file, no decoding: per temporal patch
    (temporal_patch_size frames), (height / factor) x (width / factor) <|video_pad|> tokens after the
    family's resize, plus `text_per_group` (video_text_per_group: Qwen3-VL's "<1.5 seconds>" and
    vision start/end tokens). The length proxy for group_by_length; the prompt is left out, since a
    dataset's prompts are usually one template. Computed once per run (a probe is ~1 ms for AVI/MP4;
    WebM demuxes packets)."""
    s = dataset.settings
    lengths = []
    for sample in dataset.samples:
        info = probe_video(sample.video, sample.fps)
        n = num_frames_to_sample(info, s.video_fps, s.video_maxlen, s.video_num_frames, s.temporal_patch_size)
        height, width = frame_size(info, *s.budget)
        groups = n // s.temporal_patch_size
        lengths.append(groups * ((height // s.resize_factor) * (width // s.resize_factor) + text_per_group))
    return np.asarray(lengths, dtype=np.int64)


def video_text_per_group(processor, act_token_id):
    """Text tokens the processor writes per temporal patch of a video besides its <|video_pad|>
    tokens (0 for Qwen2-VL and Qwen2.5-VL; Qwen3-VL and Qwen3.5 write "<t seconds>" and vision
    start/end each time). Measured on the processor itself: a blank clip of two temporal patches
    minus one of one patch."""
    geometry = vision_geometry(processor)
    side, step = geometry["resize_factor"], geometry["temporal_patch_size"]
    lengths = []
    for frames in (step, 2 * step):
        sample = Sample(None, [{"role": "user", "content": VIDEO_TOKEN}, {"role": "assistant", "content": ACT_TOKEN}],
                        0, "default", "probe")
        item = Item(sample, np.zeros((frames, side, side, 3), np.uint8), np.arange(frames),
                    VideoInfo(frames, 2.0, side, side), 0, True, [])
        lengths.append(Collator(processor, act_token_id)([item]).inputs["input_ids"].shape[1])
    return lengths[1] - lengths[0] - 1  # one patch of side x side is one <|video_pad|> token


# ---------------------------------------------------------------------------------------------------
# Datasets as configured (train_datasets / eval_datasets) and the loaders over them

@dataclass
class DatasetMix:
    """Several dataset files concatenated into one VideoDataset; global index i belongs to entry
    `entry_of(i)`. `classes`: label_space -> class names, from a classes.json beside the records."""
    dataset: VideoDataset
    names: list  # one per entry, for per-dataset metrics
    spaces: list  # each entry's label space
    counts: list
    weights: list
    classes: dict
    bad_videos: list  # records left out because their video is missing or empty
    warning: str | None  # what to tell the user about them

    def entry_of(self, index):
        return int(np.searchsorted(np.cumsum(self.counts), index, side="right"))


def read_class_names(path, num_classes, space):
    """classes.json beside a dataset file: a list of num_classes names (index = label)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the class names ({e}); it must be a JSON list of names, "
                        f"index = label") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a JSON list of class names (index = label), got {str(names)[:80]}")
    if len(names) != num_classes:
        raise DataError(f"{path} lists {len(names)} classes but label space {space!r} has "
                        f"{num_classes} (num_action_classes / label_spaces): make them agree")
    return names


def load_datasets(entries, head_sizes, settings, max_bad_video_fraction, seed=0, reading=None):
    reading = reading if reading is not None else Reading()
    samples, counts, weights, names, spaces, classes, bad_videos = [], [], [], [], [], {}, []
    for entry in entries:
        space = entry.get("label_space", "default")
        spaces.append(space)
        renaming = entry.get("columns") or entry.get("tags")
        rename = (lambda r, e=entry: renamed_record(r, e.get("columns"), e.get("tags"))) if renaming else None
        part, bad = load_samples(entry["path"], entry.get("video_root"), head_sizes[space], space, reading.require_label,
                                 reading.max_samples, EntryRules(rename, entry.get("frame_fps"),
                                                                 space in reading.multi_label))
        samples, bad_videos = samples + part, bad_videos + bad
        counts.append(len(part))
        weights.append(float(entry.get("weight", 1.0)))
        names.append(entry.get("name", os.path.basename(os.path.dirname(os.path.abspath(entry["path"])))))
        names_file = os.path.join(os.path.dirname(os.path.abspath(entry["path"])), "classes.json")
        if os.path.isfile(names_file):
            classes[space] = read_class_names(names_file, head_sizes[space], space)
    if len(set(names)) < len(names):  # two files in folders of the same name: tell them apart
        names = [f"{n}/{os.path.basename(e['path'])}" for n, e in zip(names, entries)]
    warning = check_bad_videos(bad_videos, len(samples) + len(bad_videos), max_bad_video_fraction)
    return DatasetMix(VideoDataset(samples, settings, seed), names, spaces, counts, weights, classes, bad_videos,
                      warning)


def held_out_count(val_size, count):
    """val_size as a count of one dataset's samples: a fraction rounds up (as Hugging Face datasets'
    train_test_split does), an int is the count itself."""
    return math.ceil(val_size * count) if isinstance(val_size, float) and val_size < 1 else int(val_size)


def hold_out(mix, val_size, seed):
    """Splits every training dataset of `mix` into a training part and a held-out part of
    held_out_count(val_size) samples, picked by a generator seeded with (seed, dataset position):
    the same split on every rank and every resume. Returns (train_mix, heldout_mix); the held-out
    samples are in no batch of train_mix, and the eval views sample them (centres, no random offsets)."""
    parts = {"train": ([], []), "held": ([], [])}  # (samples, counts)
    start = 0
    for d, (name, count) in enumerate(zip(mix.names, mix.counts)):
        samples, start = mix.dataset.samples[start:start + count], start + count
        k = held_out_count(val_size, count)
        if not 0 < k < count:
            raise ConfigError(f"val_size {val_size}: {name} has {count} usable samples, so it would hold out {k} "
                              f"and train on {count - k}; both need at least one")
        held = set(np.random.default_rng([seed, d]).permutation(count)[:k].tolist())
        for which, keep in (("train", lambda i: i not in held), ("held", lambda i: i in held)):
            chosen = [s for i, s in enumerate(samples) if keep(i)]  # file order
            parts[which][0].extend(chosen)
            parts[which][1].append(len(chosen))
    (train_samples, train_counts), (held_samples, held_counts) = parts["train"], parts["held"]
    settings = mix.dataset.settings
    train_mix = DatasetMix(VideoDataset(train_samples, settings, mix.dataset.seed), mix.names, mix.spaces,
                           train_counts, mix.weights, mix.classes, mix.bad_videos, mix.warning)
    held_mix = DatasetMix(VideoDataset(held_samples, settings, mix.dataset.seed), [f"{n}_heldout" for n in mix.names],
                          mix.spaces, held_counts, [1.0] * len(held_counts), mix.classes, [], None)
    return train_mix, held_mix

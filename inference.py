"""A trained classifier, loaded from a checkpoint folder or an export.py folder, classifying videos.

    from inference import VideoClassifier
    clf = VideoClassifier.from_pretrained("exports/ucf101")   # or runs/ucf101/checkpoints/best
    clf.predict(["a.mp4", "b.avi"], top_k=5)   # [{"video": "a.mp4", "top": [("Basketball", 0.91), ...]}, ...]

Both kinds of folder give the same object: the model, its processor, the class names of every head,
and how it samples a video (the video settings, the evaluation views, the prompt). Videos are
sampled exactly as evaluation samples them. `stream` is the batch path predict.py runs: DataLoader
workers decode (loaders.make_loader) while the model runs, results come back in input order as they
finish. An export's `actcls.json` (written by export.py from `manifest`) holds everything that is
not Hugging Face's own format.
"""

import dataclasses
import os
import sys
from contextlib import nullcontext

import torch

from checkpoint import (CONFIG_FILE, EXPORT_FILE, EXPORT_FORMAT, CheckpointError, folder_kind, load_weights,
                        read_classes, read_json)
from config import ConfigError, head_sizes, multi_label_spaces, saved_config, video_settings
from data import Collator, DataError, EntryRules, Sample, VideoDataset, load_samples
from loaders import make_loader
from evaluation import averaged_views, class_names, eval_views
from model import ACT_TOKEN, build_classifier, load_exported, load_processor, vision_geometry
from prepare.records import DEFAULT_MESSAGES
from video import VideoSettings

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
SEQ_CLS = "seq-cls"  # export.py --as seq-cls: actcls.json's `form`; the default form writes none
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class VideoClassifier:
    model: torch.nn.Module  # model.ActionClassifier, in eval mode, on `device`
    processor: object
    classes: dict  # label_space -> class names (every head)
    settings: VideoSettings  # frame sampling and pixel budget, as in training
    views: list  # evaluation views: (clip, num_clips, crop, num_crops)
    prompt: list  # sharegpt messages with <video> and <ACT>, for videos given without a record
    bf16_autocast: bool  # a checkpoint trained with bf16 evaluates under autocast, as train.py does
    device: torch.device
    multi_label: frozenset = frozenset()  # label spaces whose head is multi-label: per-class sigmoid probabilities

    @classmethod
    def from_pretrained(cls, path, device=None, fp32=False, backbone_weights=True):
        """An export.py folder or a checkpoints/step_NNNNNNN (or best) folder. `fp32`: load a
        checkpoint's base in fp32 even when it trained in bf16. `backbone_weights=False` (a checkpoint):
        everything but the backbone's weights, which stay on the meta device (export.py, which streams
        them through merge.py): heads, class names, processor, video settings; it cannot predict."""
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if classifier_kind(path) == "export":
            return cls.from_export(path, device)
        return cls.from_checkpoint(path, device, fp32, backbone_weights)

    @classmethod
    def from_checkpoint(cls, checkpoint, device, fp32=False, backbone_weights=True):
        """Rebuilds the model from the checkpoint's own config (its base model must be where
        model_name_or_path says) and loads its weights and class names."""
        cfg = saved_config(os.path.join(checkpoint, CONFIG_FILE))
        cfg.gradient_checkpointing, cfg.action_decoder_path = False, None  # inference; the weights come from here
        if fp32:
            cfg.bf16 = False
        sizes, saved = head_sizes(cfg), read_classes(checkpoint)  # checked before the model loads
        classes = {space: class_names(saved, space, n) for space, n in sizes.items()}
        for space, n in sizes.items():
            if len(classes[space]) != n:
                raise CheckpointError(f"{checkpoint}/classes.json: {len(classes[space])} class names for label space "
                                      f"{space!r}, but its head has {n} outputs")
        processor, model = build_classifier(cfg, sizes, weights=backbone_weights)
        load_weights(model, checkpoint)
        model = model.to(device) if backbone_weights else model  # a meta tensor cannot move
        return cls(model.eval(), processor, classes, video_settings(cfg, vision_geometry(processor)), eval_views(cfg), DEFAULT_MESSAGES,
                   cfg.bf16, device, multi_label_spaces(cfg))

    @classmethod
    def from_export(cls, directory, device):
        """Needs nothing outside `directory`: the merged backbone loads through plain from_pretrained."""
        manifest = read_json(os.path.join(directory, EXPORT_FILE))
        if manifest.get("form") == SEQ_CLS:
            raise CheckpointError(f"{directory} is a seq-cls export (export.py --as seq-cls), for transformers' "
                                  f"AutoModelForSequenceClassification and vLLM's pooling runner; actcls runs the "
                                  f"default form: export the checkpoint ({manifest.get('source')}) without --as")
        if manifest.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{directory}/{EXPORT_FILE}: export format {manifest.get('format')!r}, this "
                                  f"version reads {EXPORT_FORMAT}")
        processor, act_token_id = load_processor(directory)
        if act_token_id != manifest["act_token_id"]:
            raise CheckpointError(f"{directory}: the tokenizer gives {ACT_TOKEN} id {act_token_id}, the export was "
                                  f"made with {manifest['act_token_id']}")
        spaces = list(manifest["heads"])
        model = load_exported(directory, act_token_id, spaces, DTYPES[manifest["dtype"]])
        classes = {space: read_json(os.path.join(directory, "heads", space, "classes.json")) for space in spaces}
        views = [tuple(v) for v in manifest["views"]]
        return cls(model.to(device).eval(), processor, classes, VideoSettings(**manifest["video"]), views,
                   manifest["prompt"], False, device, frozenset(manifest.get("multi_label", [])))

    def manifest(self, dtype, source):
        """What export.py writes to actcls.json: everything from_export needs besides the HF files."""
        video = {**dataclasses.asdict(self.settings), "video_cache_dir": None}  # a path of the training machine
        return {"format": EXPORT_FORMAT, "act_token": ACT_TOKEN, "act_token_id": self.model.act_token_id,
                "dtype": dtype, "heads": {space: len(names) for space, names in self.classes.items()},
                "video": video, "views": [list(v) for v in self.views], "prompt": self.prompt, "source": source,
                # only when there is one, so a single-label export's file stays what older versions wrote
                **({"multi_label": sorted(self.multi_label)} if self.multi_label else {})}

    def label_space(self, name=None):
        """`name`, or the only head / "default"."""
        heads = self.model.heads
        space = name if name is not None else ("default" if "default" in heads else next(iter(heads)))
        if space not in heads:
            raise ConfigError(f"label space {space!r}: this classifier has heads {list(heads)}")
        return space

    def samples(self, inputs, label_space=None):
        """Video files, folders of videos (sorted by name) or .jsonl/.json record files (their own
        prompts; labels optional) -> data.Sample list."""
        space = self.label_space(label_space)
        check_inputs_exist(inputs)
        samples = []
        for path in inputs:
            if path.endswith((".jsonl", ".json")):
                found, bad = load_samples(path, None, len(self.classes[space]), space, require_label=False,
                                          rules=EntryRules(multi_label=space in self.multi_label))
                samples += found
                if bad:
                    print(f"skipping {len(bad)} record(s) whose video is missing or empty:\n" + "\n".join(bad),
                          file=sys.stderr)
            elif os.path.isdir(path):
                samples += [Sample(os.path.join(path, name), self.prompt, None, space, name)
                            for name in sorted(os.listdir(path)) if name.lower().endswith(VIDEO_EXTENSIONS)]
            else:
                samples.append(Sample(os.path.abspath(path), self.prompt, None, space, path))
        if not samples:
            raise DataError(f"no videos found in {inputs}")
        return samples

    def stream(self, samples, top_k=5, batch_size=8, num_workers=0):
        """Yields (sample, [(class index, probability), ...] or None, error or None) for every sample,
        in order, as soon as all its views are through the model. An unreadable video yields None
        and the reason; the rest go on. One label space per call (one head)."""
        views, n = self.views, len(samples)
        plan = [[(i, 0, False, view) for i in range(start, min(start + batch_size, n))]
                for start in range(0, n, batch_size) for view in views]
        collate = Collator(self.processor, self.model.act_token_id)
        loader = make_loader(VideoDataset(samples, self.settings), plan, collate, num_workers, seed=0)
        context = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16_autocast else nullcontext()
        ready, messages, done = {}, [], 0
        for index, p, _, _, readable in averaged_views(self.model, loader, len(views), context, self.device, messages,
                                                       self.multi_label):
            ready[index] = p, readable
            while done in ready:  # emit in input order
                (p, readable), sample = ready.pop(done), samples[done]
                if not readable:
                    why = [m for m in messages if m.startswith(sample.source + ": ")]
                    yield sample, None, why[0] if why else f"{sample.source}: unreadable video"
                else:
                    top = p.topk(min(top_k, len(p)))
                    yield sample, list(zip(top.indices.tolist(), top.values.tolist())), None
                done += 1

    def predict(self, videos, top_k=5, label_space=None, batch_size=8, num_workers=0, threshold=None):
        """[{"video", "top": [(class name, probability), ...]}] in the order given, or
        {"video", "error"} for a video that cannot be read. A multi-label space's probabilities are
        each class's own (sigmoid): its rows also hold "probs" {class name: probability} of every
        class and "chosen", the classes at or above `threshold` (default 0.5); a single-label space
        gets "chosen" when a threshold is given."""
        space = self.label_space(label_space)
        names, multi = self.classes[space], space in self.multi_label
        threshold = threshold if threshold is not None else (0.5 if multi else None)
        results = []
        for sample, top, error in self.stream(self.samples(videos, space), len(names) if multi else top_k, batch_size,
                                              num_workers):
            if top is None:
                results.append({"video": sample.video, "error": error})
                continue
            row = {"video": sample.video, "top": [(names[c], p) for c, p in top[:top_k]]}
            if multi:
                row["probs"] = {names[c]: p for c, p in sorted(top)}
            if threshold is not None:
                row["chosen"] = [names[c] for c, p in top if p >= threshold]
            results.append(row)
        return results


def classifier_kind(path):
    """"checkpoint" or "export"; anything else is refused, saying what to pass."""
    kind = folder_kind(path)
    if kind not in ("checkpoint", "export"):
        raise CheckpointError(f"{path}: neither a checkpoint folder (config.yaml, trainer_state.json) nor an "
                              f"export ({EXPORT_FILE}); pass runs/NAME/checkpoints/step_NNNNNNN (or best), or "
                              f"a folder export.py wrote")
    return kind


def check_inputs_exist(paths):
    """Each video or folder of videos exists (a record file's own check, load_samples, names what is
    wrong with it); predict.py calls this before the model loads, so a mistyped path is said at once."""
    for path in paths:
        if not path.endswith((".jsonl", ".json")) and not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder")

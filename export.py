"""Export a checkpoint as one self-contained folder: a normal Hugging Face checkpoint plus the heads.

    python export.py --checkpoint runs/ucf101/checkpoints/best --out exports/ucf101 [--dtype bf16|fp32]

The folder needs nothing else (no base model, no training config, no peft):
    config.json, model*.safetensors   the VLM with LoRA/DoRA merged (merge_and_unload), fully trained
                                      modules in place, the trained <ACT> row in the embedding table
    tokenizer*, *processor*.json,     the tokenizer with <ACT> registered, the processor and chat template
      chat_template*
    heads/<label_space>/              action_decoder.{safetensors,json} and classes.json, for every head
    actcls.json                       video settings (fps, maxlen, fixed frame count, pixel budget), the
                                      evaluation views and the prompt, so inference samples as in training
    README.md                         the model card: family, classes, the checkpoint's eval metrics, usage
Written to a temp folder next to --out and renamed, so an interrupted export never looks complete.
Load it with inference.VideoClassifier.from_pretrained(DIR) or predict.py --checkpoint DIR; the
backbone alone loads with transformers' AutoModelForImageTextToText.from_pretrained(DIR).
"""

import argparse
import glob
import json
import os
import sys

from checkpoint import EXPORT_FILE, CheckpointError, folder_kind, read_json, write_atomically
from config import ConfigError
from data import USER_ERRORS
from inference import DTYPES, VideoClassifier
from merge import write_merged_backbone

SHARD_SIZE = "2GB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_NNNNNNN (or best) folder")
    p.add_argument("--out", required=True, help="the folder to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="weights of the backbone (heads stay fp32); bf16 halves the size")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.dtype)
    except USER_ERRORS as e:
        raise SystemExit(str(e)) from None
    except OSError as e:  # --out not writable, disk full
        raise SystemExit(f"cannot write the export to {args.out}: {e.strerror or e}") from None
    print(f"exported {args.checkpoint} to {out} ({folder_size(out) / 1e6:.1f} MB)")


def export(checkpoint, out, dtype):
    if folder_kind(checkpoint) == "export":
        raise CheckpointError(f"{checkpoint} is an export already; export.py takes a checkpoint folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not an empty folder; remove it or choose another")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomically(out, lambda tmp: write_export(checkpoint, tmp, dtype))  # an empty `out` is replaced
    return out


def write_export(checkpoint, directory, dtype):
    os.makedirs(directory)  # fails early, before the model loads, when the folder cannot be written
    # The backbone streams from the base's files to the export one tensor at a time (merge.py: each
    # merged in fp32, then cast), so the classifier is loaded without its weights.
    clf = VideoClassifier.from_pretrained(checkpoint, device="cpu", backbone_weights=False)
    manifest = clf.manifest(dtype, source=os.path.abspath(checkpoint))
    vlm, tied = write_merged_backbone(checkpoint, directory, DTYPES[dtype], SHARD_SIZE)
    clf.processor.save_pretrained(directory)
    for space, head in clf.model.heads.items():
        head.save_pretrained(os.path.join(directory, "heads", space))
        with open(os.path.join(directory, "heads", space, "classes.json"), "w", encoding="utf-8") as f:
            json.dump(clf.classes[space], f, ensure_ascii=False, indent=1)
    with open(os.path.join(directory, EXPORT_FILE), "w", encoding="utf-8") as f:
        json.dump({**manifest, "tied_embeddings": tied}, f, indent=1)
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(vlm, manifest, clf.classes, checkpoint_metrics(checkpoint), tied))


def checkpoint_metrics(checkpoint):
    """{dataset: {top1, top5, ...}} of this checkpoint: an eval.json that names it (in the
    checkpoint or its run folder), else the run's metrics.jsonl val lines at its step."""
    real = os.path.realpath(checkpoint)
    run = os.path.dirname(os.path.dirname(real))
    for path in [os.path.join(real, "eval.json"), *sorted(glob.glob(os.path.join(run, "*", "eval.json"))),
                 os.path.join(run, "eval.json")]:
        report = read_if_json(path)
        if report and report.get("checkpoint") and os.path.realpath(report["checkpoint"]) == real:
            keep = ("top1", "top5", "mean_class_acc", "loss", "count")
            return {name: {k: r[k] for k in keep if k in r} | {"source": "eval.json", "views": report.get("views")}
                    for name, r in report.get("datasets", {}).items()}
    step = (read_if_json(os.path.join(real, "trainer_state.json")) or {}).get("step")
    metrics = {}
    if step is not None and os.path.isfile(os.path.join(run, "metrics.jsonl")):
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("split") == "val" and row.get("step") == step:
                    metrics[row.get("dataset", "val")] = {k: row[k] for k in ("top1", "top5", "mean_class_acc",
                                                                           "loss", "count") if k in row}
    return metrics


def read_if_json(path):
    try:
        return read_json(path)
    except CheckpointError:
        return None


def model_card(vlm, manifest, classes, metrics, tied):
    video = manifest["video"]
    sampling = (f"{video['video_num_frames']} frames" if video["video_num_frames"] is not None
                else f"{video['video_fps']} fps, at most {video['video_maxlen']} frames")
    lines = [f"# Video action classifier ({vlm.config.model_type})", "",
             f"Exported by actcls from `{manifest['source']}`: a `{type(vlm).__name__}` with the adapters "
             f"merged, weights in {manifest['dtype']}, the `<ACT>` token (id {manifest['act_token_id']}) "
             f"registered in the tokenizer and its trained row written into the input embedding table.",
             "The table is tied to `lm_head` (the classifier never runs `lm_head`; in text generation only the "
             "logit of emitting `<ACT>` differs)." if tied else "`lm_head` is untied and unchanged.", "",
             f"Video: {sampling}, {video['video_min_pixels']}-{video['video_max_pixels']} pixels a frame, "
             f"{len(manifest['views'])} view(s).", "", "## Heads", ""]
    for space, names in classes.items():
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        lines.append(f"- `{space}`: {len(names)} classes: {shown}")
    lines += ["", "## Metrics of this checkpoint", ""]
    if metrics:
        lines += ["| dataset | top-1 | top-5 | mean class acc | samples |", "|---|---|---|---|---|"]
        for name, m in metrics.items():
            cells = [f"{m[k]:.4f}" if k in m else "" for k in ("top1", "top5", "mean_class_acc")]
            lines.append(f"| {name} | {' | '.join(cells)} | {m.get('count', '')} |")
    else:
        lines.append("None recorded (no eval.json for this checkpoint, no val line at its step in metrics.jsonl).")
    lines += ["", "## Use", "", "```python", "from inference import VideoClassifier  # actcls",
              "clf = VideoClassifier.from_pretrained(\"THIS_FOLDER\")",
              "print(clf.predict([\"a.mp4\", \"b.avi\"], top_k=5))", "```", "",
              "Many videos: `python predict.py --checkpoint THIS_FOLDER videos/ --out results.jsonl "
              "--num_workers 4`.", ""]
    return "\n".join(lines)


def folder_size(directory):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(directory) for n in files)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)

"""Export a checkpoint as one self-contained folder: a normal Hugging Face checkpoint plus the heads and code.

    python export.py --checkpoint runs/ucf101/checkpoints/best --out exports/ucf101 [--dtype bf16|fp32]
    python export.py --checkpoint runs/ucf101/checkpoints/best --out exports/ucf101-seqcls --as seq-cls

The folder needs nothing else (no base model, no training config, no peft):
    config.json, model*.safetensors   the VLM with LoRA/DoRA merged (merge_and_unload), fully trained
                                      modules in place, the trained <ACT> row in the embedding table
    tokenizer*, *processor*.json,     the tokenizer with <ACT> registered, the processor and chat template
      chat_template*
    heads/<label_space>/              action_decoder.{safetensors,json} and classes.json, for every head
    actcls.json                       video settings (fps, maxlen, fixed frame count, pixel budget), the
                                      evaluation views and the prompt, so inference samples as in training
    README.md                         the model card: family, classes, the checkpoint's eval metrics, usage
    modeling_actcls.py, chat.py,      the code that runs it under transformers alone, copied from this
      video.py, decoder.py            repository; config.json's auto_map and custom_pipelines point at it
Written to a temp folder next to --out and renamed, so an interrupted export never looks complete.
Load it with inference.VideoClassifier.from_pretrained(DIR) or predict.py --checkpoint DIR, or without
actcls: transformers' AutoModel.from_pretrained(DIR, trust_remote_code=True).predict(videos) and
pipeline("video-classification", model=DIR, trust_remote_code=True). The backbone alone loads with
AutoModelForImageTextToText.from_pretrained(DIR). --checkpoint may be an export too (one of an older
actcls, say): it is written again in this version's form, code included.

--as seq-cls: the sequence-classification layout that transformers' *ForSequenceClassification and
vLLM's pooling runner read (one linear head only): the inner model's weights under `model.`, the head
as `score` (no bias: the bias goes to actcls.json's `score_bias`, see docs/ship.md), num_labels,
id2label and label2id, and the architecture Qwen2_5_VLForSequenceClassification (or the family's).
"""

import argparse
import copy
import glob
import json
import os
import shutil
import sys

from checkpoint import CONFIG_FILE, EXPORT_FILE, CheckpointError, folder_kind, read_json, write_atomically
from config import ConfigError, head_sizes, saved_config
from data import USER_ERRORS
from inference import DTYPES, SEQ_CLS, VideoClassifier, classifier_kind
from merge import write_merged_backbone
from model import merged_backbone
from modeling_actcls import AUTO_MAP, CODE_FILES, CUSTOM_PIPELINES

SHARD_SIZE = "2GB"
HERE = os.path.dirname(os.path.abspath(__file__))  # where the copied code files live
FORMS = ("actcls", SEQ_CLS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_NNNNNNN (or best) folder")
    p.add_argument("--out", required=True, help="the folder to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="weights of the backbone (heads stay fp32); bf16 halves the size")
    p.add_argument("--as", dest="form", choices=FORMS, default="actcls",
                   help="actcls (default): every head, runs with actcls or transformers' trust_remote_code; "
                        "seq-cls: one linear head as `score`, for *ForSequenceClassification and vLLM")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.dtype, args.form)
    except USER_ERRORS as e:
        raise SystemExit(str(e)) from None
    except OSError as e:  # --out not writable, disk full
        raise SystemExit(f"cannot write the export to {args.out}: {e.strerror or e}") from None
    print(f"exported {args.checkpoint} to {out} ({folder_size(out) / 1e6:.1f} MB)")


def export(checkpoint, out, dtype, form="actcls"):
    classifier_kind(checkpoint)  # a checkpoint, or an export (written again in this version's form)
    if form == SEQ_CLS:
        check_seq_cls(checkpoint, declared_heads(checkpoint))  # before the model loads
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not an empty folder; remove it or choose another")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write = write_export if form == "actcls" else write_seq_cls
    write_atomically(out, lambda tmp: write(checkpoint, tmp, dtype))  # an empty `out` is replaced
    return out


def write_export(checkpoint, directory, dtype):
    os.makedirs(directory)  # fails early, before the model loads, when the folder cannot be written
    clf, vlm, tied = write_backbone(checkpoint, directory, dtype)
    manifest = clf.manifest(dtype, source=os.path.abspath(checkpoint))
    clf.processor.save_pretrained(directory)
    for space, head in clf.model.heads.items():
        head.save_pretrained(os.path.join(directory, "heads", space))
        with open(os.path.join(directory, "heads", space, "classes.json"), "w", encoding="utf-8") as f:
            json.dump(clf.classes[space], f, ensure_ascii=False, indent=1)
    with open(os.path.join(directory, EXPORT_FILE), "w", encoding="utf-8") as f:
        json.dump({**manifest, "tied_embeddings": tied}, f, indent=1)
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(vlm, manifest, clf.classes, checkpoint_metrics(checkpoint), tied))
    write_code(directory)


def write_backbone(checkpoint, directory, dtype):
    """The merged backbone's config.json and weights. From a checkpoint they stream from the base's
    files one tensor at a time (merge.py: each merged in fp32, then cast), so the classifier loads
    without its backbone weights. An export (written again in this version's form) is merged
    already: it loads whole. Returns (classifier, vlm, whether lm_head shares the table)."""
    if folder_kind(checkpoint) == "checkpoint":
        clf = VideoClassifier.from_pretrained(checkpoint, device="cpu", backbone_weights=False)
        return (clf, *write_merged_backbone(checkpoint, directory, DTYPES[dtype], SHARD_SIZE))
    clf = VideoClassifier.from_pretrained(checkpoint, device="cpu", fp32=True)
    vlm, tied = merged_backbone(clf.model)
    vlm.to(DTYPES[dtype]).save_pretrained(directory, max_shard_size=SHARD_SIZE)
    return clf, vlm, tied


def write_code(directory):
    """The code the export runs with under transformers alone, copied from this repository (one copy
    of each file: the export's are made from it), and config.json pointing at it as the Hub does:
    auto_map (AutoModel) and custom_pipelines (what PIPELINE_REGISTRY.register_pipeline and
    Pipeline.save_pretrained write)."""
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(directory, name))
    path = os.path.join(directory, "config.json")
    config = read_json(path)
    config.update(auto_map=AUTO_MAP, custom_pipelines=CUSTOM_PIPELINES)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# --as seq-cls: the layout of transformers' *ForSequenceClassification and vLLM's pooling runner

def declared_heads(folder):
    """{label_space: head type} as the folder describes them, read without loading any weights."""
    if folder_kind(folder) == "export":
        manifest = read_json(os.path.join(folder, EXPORT_FILE))
        if manifest.get("form") == SEQ_CLS:
            raise CheckpointError(f"{folder} is a seq-cls export already; export the checkpoint it came from "
                                  f"({manifest.get('source')}) or a default-form export of it")
        return {space: read_json(os.path.join(folder, "heads", space, "action_decoder.json"))["decoder_type"]
                for space in manifest.get("heads", {})}
    cfg = saved_config(os.path.join(folder, CONFIG_FILE))
    return {space: cfg.action_decoder_type for space in head_sizes(cfg)}


def check_seq_cls(folder, heads):
    """The layout holds one linear map from the <ACT> state to the classes: `score`."""
    default = f"`python export.py --checkpoint {folder} --out DIR` (the default form: every head, any type)"
    if len(heads) != 1:
        raise ConfigError(f"{folder} has {len(heads)} heads ({', '.join(heads)}), and the seq-cls layout holds one; "
                          f"export it with {default}, which runs under transformers with trust_remote_code")
    kind, = heads.values()
    if kind != "linear":
        raise ConfigError(f"{folder}: its head is `{kind}`, and the seq-cls layout holds a linear head only "
                          f"(`score`); export it with {default}, which runs under transformers with "
                          f"trust_remote_code")


def write_seq_cls(checkpoint, directory, dtype):
    os.makedirs(directory)
    clf = VideoClassifier.from_pretrained(checkpoint, device="cpu", fp32=True)
    check_seq_cls(checkpoint, {space: head.config["decoder_type"] for space, head in clf.model.heads.items()})
    write_seq_cls_files(clf, directory, dtype, os.path.abspath(checkpoint))


def write_seq_cls_files(clf, directory, dtype, source):
    """clf's backbone (merged) and its one linear head as a *ForSequenceClassification checkpoint: the
    ForConditionalGeneration's weights without lm_head (a classifier never runs it) + `score.weight`.
    The head's bias has no place there (transformers' and vLLM's `score` have none): it goes to
    actcls.json's `score_bias`."""
    from huggingface_hub import save_torch_state_dict
    from transformers.core_model_loading import revert_weight_conversion

    (space, head), = clf.model.heads.items()
    names = clf.classes[space]
    manifest = {**clf.manifest(dtype, source), "form": SEQ_CLS, "label_space": space,
                "score_bias": head.net.bias.detach().tolist()}
    vlm, tied = merged_backbone(clf.model)
    state = {name: tensor for name, tensor in vlm.state_dict().items() if not name.startswith("lm_head.")}
    # the names the family's checkpoints use, as save_pretrained writes them (Qwen2.5-VL: model.layers.*,
    # visual.*), which every loader of the family maps; transformers' in-memory names are its own
    state = {name: tensor.to(DTYPES[dtype]) for name, tensor in revert_weight_conversion(vlm, state).items()}
    state["score.weight"] = head.net.weight.detach().to(DTYPES[dtype])
    save_torch_state_dict(state, directory, max_shard_size=SHARD_SIZE)
    seq_cls_config(vlm, names, clf.processor.tokenizer.pad_token_id, dtype).save_pretrained(directory)
    clf.processor.save_pretrained(directory)
    with open(os.path.join(directory, EXPORT_FILE), "w", encoding="utf-8") as f:
        json.dump({**manifest, "tied_embeddings": tied}, f, indent=1)
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(seq_cls_card(vlm, manifest, names))


def seq_cls_config(vlm, names, pad_token_id, dtype):
    """The VLM's config as a sequence classifier's: the architecture, the labels at the top level and
    in text_config (vLLM reads one, transformers the other), and the pad token, so the pooled token is
    each row's last real one (<ACT>: actcls inputs end there)."""
    config = copy.deepcopy(vlm.config)
    config.architectures = [seq_cls_architecture(vlm)]
    config.hidden_size = config.get_text_config().hidden_size  # vLLM sizes `score` from the top level
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.num_labels = len(names)  # first: setting it resets id2label to LABEL_i
        c.id2label = dict(enumerate(names))
        c.label2id = {name: i for i, name in enumerate(names)}
        c.pad_token_id = pad_token_id
    config.dtype = DTYPES[dtype]
    return config


def seq_cls_architecture(vlm):
    """Qwen2_5_VLForConditionalGeneration -> Qwen2_5_VLForSequenceClassification, and so on per family."""
    return type(vlm).__name__.replace("ForConditionalGeneration", "ForSequenceClassification")


def seq_cls_card(vlm, manifest, names):
    video = manifest["video"]
    sampling = (f"{video['video_num_frames']} frames" if video["video_num_frames"] is not None
                else f"{video['video_fps']} fps, at most {video['video_maxlen']} frames")
    return "\n".join([
        f"# Video action classifier ({vlm.config.model_type}), sequence-classification layout", "",
        f"Exported by actcls from `{manifest['source']}` as `{seq_cls_architecture(vlm)}`: the VLM with its "
        f"adapters merged (weights in {manifest['dtype']}), the trained `<ACT>` row (token id "
        f"{manifest['act_token_id']}) in its embedding table, and the linear head as `score` "
        f"({len(names)} labels: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}).", "",
        "The prompt must end at `<ACT>` (the last token is the one pooled): actcls.json holds the prompt, "
        f"and the video settings it trained with ({sampling}, {video['video_min_pixels']}-"
        f"{video['video_max_pixels']} pixels a frame).", "",
        "`score` has no bias (neither transformers' nor vLLM's has one): actcls.json's `score_bias` is the "
        "head's bias. Add it to the logits for actcls's logits; for probabilities, multiply each class's "
        "by exp(bias) and renormalise. See actcls's docs/ship.md.", ""])
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
              "--num_workers 4`.", "",
              "Without actcls (transformers, torch, torchvision, av and numpy installed; the code is in this folder):", "",
              "```python", "from transformers import AutoModel, pipeline",
              "clf = AutoModel.from_pretrained(\"THIS_FOLDER\", trust_remote_code=True)",
              "print(clf.predict([\"a.mp4\"], top_k=5))",
              "pipe = pipeline(\"video-classification\", model=\"THIS_FOLDER\", trust_remote_code=True)",
              "print(pipe(\"a.mp4\"))  # [{\"score\": ..., \"label\": ...}, ...]", "```", ""]
    return "\n".join(lines)


def folder_size(directory):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(directory) for n in files)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)

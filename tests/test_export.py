"""Issue 14: export.py, inference.VideoClassifier and predict.py's batch mode.

One short run per fine-tuning mode (DoRA + an additional_target, plain LoRA, full), each exported;
the checkpoints' logits are computed while the base model exists, then the base model is deleted, so
every export is loaded without it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import checkpoint
import export
import inference
import modeling_actcls
import train
from data import Collator, VideoDataset
from decoder import ActionDecoder
from inference import VideoClassifier
from prepare.synthetic import CLASSES
from prepare.tiny_model import write_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32_TOL = 1e-5  # merged vs unmerged adapters in fp32: rounding only (measured ~1e-6)
BF16_TOL = 3e-2  # bf16 weights (8-bit mantissa) against the fp32 checkpoint, on logits of size ~1 (measured ~1e-2)
MODES = {"dora+additional_target": [],  # configs/synthetic.yaml: DoRA on LM + vision, patch_embed trained fully
         "lora": ["--use_dora", "false", "--additional_target", "null"],
         "full": ["--finetuning_type", "full", "--additional_target", "null"]}


def run_args(model_dir, synthetic_dir, out, evaluate):
    evals = f"[{{path: {synthetic_dir}/val.jsonl}}]" if evaluate else "[]"
    return ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", model_dir,
            "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]", "--eval_datasets", evals,
            "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "6", "--dataloader_num_workers", "0", "--logging_steps", "1",
            "--max_steps", "1", "--output_dir", str(out)]


def logits_of(clf, samples):
    """The classifier's logits on these samples, with its own processor and video settings."""
    dataset = VideoDataset(samples, clf.settings)
    batch = Collator(clf.processor, clf.model.act_token_id)([dataset[(i, 0, False)] for i in range(len(samples))])
    with torch.no_grad():
        return clf.model("default", **batch.inputs).float(), batch


@pytest.fixture(scope="module")
def exported(synthetic_dir, tmp_path_factory):
    """{mode: (checkpoint, export dir, checkpoint logits)} + the bf16 export of the first mode and the
    samples. The base model is a private copy, deleted once the checkpoints' logits are known."""
    root = tmp_path_factory.mktemp("export")
    base = write_tiny_model(str(root / "base" / "tiny-qwen2.5-vl"), seed=0)
    out = {}
    for i, (mode, extra) in enumerate(MODES.items()):
        run = root / f"run_{i}"
        train.main(run_args(base, synthetic_dir, run, evaluate=i == 0) + extra)
        checkpoint = str(run / "checkpoints" / ("best" if i == 0 else "step_0000001"))
        clf = VideoClassifier.from_pretrained(checkpoint, "cpu")
        samples = clf.samples([os.path.join(synthetic_dir, "val.jsonl")])[:4]
        reference, batch = logits_of(clf, samples)
        target = str(root / f"export_{i}")
        export.main(["--checkpoint", checkpoint, "--out", target, "--dtype", "fp32"])
        out[mode] = (checkpoint, target, reference, batch, clf.model.act_embedding.detach().clone())
    bf16 = str(root / "export_bf16")
    export.main(["--checkpoint", out["dora+additional_target"][0], "--out", bf16, "--dtype", "bf16"])
    shutil.rmtree(os.path.dirname(base))  # self-containment: nothing below may need the base model
    return out, bf16, samples


@pytest.mark.parametrize("mode", list(MODES))
def test_export_gives_the_checkpoints_logits(exported, mode):
    out, _, samples = exported
    _, target, reference, _, _ = out[mode]
    logits, _ = logits_of(VideoClassifier.from_pretrained(target, "cpu"), samples)
    diff = (logits - reference).abs().max().item()
    print(f"{mode} fp32 export: max |logit difference| {diff:.3g}")
    assert diff <= FP32_TOL
    assert reference.std(0).max() > 1e-3  # the videos give different logits: the comparison means something


def test_bf16_export_is_close_and_half_the_size(exported):
    out, bf16, samples = exported
    _, fp32, reference, _, _ = out["dora+additional_target"]
    clf = VideoClassifier.from_pretrained(bf16, "cpu")
    assert clf.model.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    logits, _ = logits_of(clf, samples)
    diff = (logits - reference).abs().max().item()
    print(f"bf16 export: max |logit difference| {diff:.3g} (logits up to {reference.abs().max().item():.3g})")
    assert diff <= BF16_TOL
    size = {d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
            for d in (bf16, fp32)}
    assert size[bf16] == pytest.approx(size[fp32] / 2, rel=0.01)


def test_export_is_a_plain_hugging_face_checkpoint_with_the_act_row(exported):
    """transformers alone loads the backbone (no peft, no base model: deleted); its embedding table
    holds the trained <ACT> row (and, tied, so does lm_head); backbone + saved head = the logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, _, _ = exported
    _, target, reference, batch, act_row = out["dora+additional_target"]
    vlm = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32)
    assert type(vlm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any("lora" in name for name, _ in vlm.named_parameters())
    manifest = json.load(open(os.path.join(target, "actcls.json")))
    act_id = manifest["act_token_id"]
    assert AutoProcessor.from_pretrained(target).tokenizer.convert_tokens_to_ids("<ACT>") == act_id
    assert torch.equal(vlm.get_input_embeddings().weight[act_id], act_row)
    assert manifest["tied_embeddings"] is vlm.config.tie_word_embeddings is True  # the tiny model ties, as 3B does
    assert torch.equal(vlm.get_output_embeddings().weight[act_id], act_row)
    inputs = {k: v for k, v in batch.inputs.items() if k != "act_index"}
    with torch.no_grad():
        hidden = vlm.model(**inputs, use_cache=False).last_hidden_state
        logits = ActionDecoder.from_pretrained(os.path.join(target, "heads", "default"))(
            hidden[torch.arange(len(hidden)), batch.inputs["act_index"]])
    assert (logits - reference).abs().max().item() <= FP32_TOL

    files = sorted(os.path.relpath(os.path.join(d, f), target) for d, _, names in os.walk(target) for f in names)
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "actcls.json",
                   "README.md", "heads/default/action_decoder.safetensors", "heads/default/classes.json"):
        assert needed in files, files
    assert json.load(open(os.path.join(target, "heads", "default", "classes.json"))) == CLASSES
    assert manifest["video"] == {"video_fps": 4, "video_maxlen": 8, "video_num_frames": None,
                                 "video_min_pixels": 3136, "video_max_pixels": 3136, "video_cache_dir": None,
                                 "resize_factor": 28, "temporal_patch_size": 2}  # Qwen2.5-VL's geometry
    card = open(os.path.join(target, "README.md")).read()
    val = [json.loads(line) for line in open(os.path.join(out["dora+additional_target"][0], "..", "..", "metrics.jsonl"))
           if '"val"' in line][-1]
    assert all(name in card for name in CLASSES) and f"{val['top1']:.4f}" in card and "from_pretrained" in card


def test_three_line_api_predicts_names_and_probabilities(exported, synthetic_dir):
    out, _, samples = exported
    clf = VideoClassifier.from_pretrained(out["lora"][1], "cpu")
    results = clf.predict([samples[0].video, samples[1].video], top_k=3)
    assert [r["video"] for r in results] == [samples[0].video, samples[1].video]
    for r in results:
        names, probs = zip(*r["top"])
        assert set(names) <= set(CLASSES) and len(names) == 3 and list(probs) == sorted(probs, reverse=True)


# ---------------------------------------------------------------------------------------------------
# Batch prediction: killed half-way, rerun, each video exactly once; an unreadable video reported

def predict_cmd(target, folder, out, workers):
    return [sys.executable, os.path.join(ROOT, "predict.py"), "--checkpoint", target, str(folder), "--out", str(out),
            "--batch_size", "1", "--num_workers", str(workers), "--device", "cpu"]


def test_batch_predict_killed_half_way_resumes_each_video_once(exported, synthetic_dir, tmp_path):
    out, _, _ = exported
    target = out["lora"][1]
    folder = tmp_path / "clips"
    shutil.copytree(os.path.join(synthetic_dir, "videos"), folder, ignore=shutil.ignore_patterns("train_*"))
    (folder / "zz_broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    videos = sorted(str(folder / f) for f in os.listdir(folder) if f.endswith((".mp4", ".avi", ".webm")))
    assert len(videos) == 13  # the 12 validation clips (4 AVI, 4 MP4, 4 WebM) and the broken one
    results = tmp_path / "results.jsonl"

    first = subprocess.Popen(predict_cmd(target, folder, results, 0), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = results.read_text().count("\n")
    assert 2 <= done < len(videos), f"the kill came after {done} of {len(videos)} videos"
    with open(results, "a") as f:
        f.write('{"video": "' + videos[done] + '", "to')  # a line torn by the crash: that video runs again

    second = subprocess.run(predict_cmd(target, folder, results, 2), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "videos/s" in second.stderr
    assert f"{len(videos) - done} videos to classify ({done} already" in second.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["video"] for r in rows) == videos  # each exactly once
    broken = [r for r in rows if r["video"].endswith("zz_broken.mp4")]
    assert "zz_broken.mp4" in broken[0]["error"] and "top" not in broken[0]
    good = [r for r in rows if "top" in r]
    assert len(good) == len(videos) - 1 and all(t["class"] in CLASSES for r in good for t in r["top"])
    # the batch path (workers, files) gives the one-by-one API's probabilities
    one = VideoClassifier.from_pretrained(target, "cpu").predict([good[-1]["video"]], top_k=5)[0]
    assert [p for _, p in one["top"]] == pytest.approx([t["prob"] for t in good[-1]["top"]], abs=3e-6)


# ---------------------------------------------------------------------------------------------------
# Bad input: one message, exit code, no traceback

def test_export_refuses_a_folder_that_is_not_a_checkpoint(synthetic_dir, tmp_path):
    with pytest.raises(SystemExit) as err:
        export.main(["--checkpoint", synthetic_dir, "--out", str(tmp_path / "x")])
    assert "neither a checkpoint folder" in str(err.value) and not (tmp_path / "x").exists()


def test_export_to_an_unwritable_or_occupied_out(exported, tmp_path):
    checkpoint = exported[0]["lora"][0]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as err:
        export.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "a_file" / "export")])
    assert str(err.value).startswith(f"cannot write the export to {tmp_path / 'a_file' / 'export'}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        export.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "full")])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no temp folder left behind


def test_export_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", str(tmp_path),
                             "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "neither a checkpoint folder" in result.stderr


# ---------------------------------------------------------------------------------------------------
# Issue 21: the export without actcls (transformers' trust_remote_code, a custom pipeline), re-exporting
# an export (one of an older actcls), and the seq-cls layout's refusals. Qwen3.5's seq-cls logits
# against actcls's: tests/test_hub.py.

# Run by a fresh interpreter outside the repository (-I: no cwd, no PYTHONPATH on sys.path), so only
# the export's own copies of the code can serve it.
TRANSFORMERS_ALONE = r"""
import importlib.util, json, sys
from transformers import AutoModel, pipeline
export, clips, missing, views = json.loads(sys.argv[1])
assert not any(importlib.util.find_spec(m) for m in ("inference", "data", "model", "chat", "video")), sys.path
clf = AutoModel.from_pretrained(export, trust_remote_code=True)
out = {"predict": clf.predict(clips, top_k=6)}
clf.views = [tuple(v) for v in views]  # as if actcls.json said so
out["views"] = clf.predict(clips[:1], top_k=6)
pipe = pipeline("video-classification", model=export, trust_remote_code=True, device="cpu")
out["pipeline"], out["pipeline_list"] = pipe(clips[0], top_k=3), pipe(clips[:2], top_k=2)
for name in (missing, clips[-1]):  # a missing file, an unreadable one
    try:
        pipe(name)
    except Exception as e:
        out.setdefault("errors", []).append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


def assert_same_top(got, want, tol=FP32_TOL):
    assert got["video"] == want["video"] and [c for c, _ in got["top"]] == [c for c, _ in want["top"]]
    assert max(abs(p - q) for (_, p), (_, q) in zip(got["top"], want["top"])) <= tol


def test_transformers_alone_predicts_as_video_classifier(exported, tmp_path):
    """AutoModel(trust_remote_code).predict and the folder's pipeline, in an interpreter with no actcls
    on its path, give VideoClassifier.predict's classes and probabilities (fp32 export), with one
    view and averaged over two (other clips, other crops); unreadable videos: predict's error entry,
    the pipeline's errors."""
    out, _, samples = exported
    target = out["lora"][1]
    views = [(0, 2, 0, 3), (1, 2, 2, 3)]  # two temporal clips, two spatial crops
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(3000))
    clips = [samples[0].video, samples[1].video, str(broken)]
    args = json.dumps([target, clips, str(tmp_path / "missing.mp4"), views])
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # the code's copies go here, not ~/.cache
    result = subprocess.run([sys.executable, "-I", "-c", TRANSFORMERS_ALONE, args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])

    clf = VideoClassifier.from_pretrained(target, "cpu")
    want = clf.predict(clips, top_k=6)
    for g, w in zip(got["predict"][:2], want[:2]):
        assert_same_top(g, w)
    assert got["predict"][2] == want[2] and "broken.mp4: cannot open video" in want[2]["error"]
    clf.views = views
    assert_same_top(got["views"][0], clf.predict(clips[:1], top_k=6)[0])
    assert got["views"][0]["top"] != got["predict"][0]["top"]  # the views changed something
    assert [(d["label"], d["score"]) for d in got["pipeline"]] == [tuple(t) for t in got["predict"][0]["top"][:3]]
    assert [[d["label"] for d in r] for r in got["pipeline_list"]] == [[c for c, _ in r["top"][:2]]
                                                                        for r in got["predict"][:2]]
    (missing_type, missing_msg), (bad_type, bad_msg) = got["errors"]
    assert missing_type == "FileNotFoundError" and str(tmp_path / "missing.mp4") in missing_msg
    assert bad_type == "DataError" and bad_msg.startswith(f"{broken}: cannot open video")


def test_an_export_is_written_again_with_the_code(exported, tmp_path):
    """An export (an older actcls's has no code) given as --checkpoint comes out in this version's form,
    code and config.json entries included, the same weights and settings."""
    source = tmp_path / "old"
    shutil.copytree(exported[0]["lora"][1], source, ignore=shutil.ignore_patterns(*modeling_actcls.CODE_FILES))
    config = json.load(open(source / "config.json"))
    json.dump({k: v for k, v in config.items() if k not in ("auto_map", "custom_pipelines")}, open(source / "config.json", "w"))
    export.main(["--checkpoint", str(source), "--out", str(tmp_path / "new"), "--dtype", "fp32"])
    new = tmp_path / "new"
    for name in modeling_actcls.CODE_FILES:
        assert (new / name).read_text() == open(os.path.join(ROOT, name)).read()
    config = json.load(open(new / "config.json"))
    assert config["auto_map"] == {"AutoModel": "modeling_actcls.ActclsVideoClassifier"}
    assert config["custom_pipelines"]["video-classification"]["impl"] == "modeling_actcls.ActclsVideoClassificationPipeline"
    for weights in ("model.safetensors", "heads/default/action_decoder.safetensors"):  # the same model
        old, written = load_file(source / weights), load_file(new / weights)
        assert old.keys() == written.keys() and all(torch.equal(old[k], written[k]) for k in old)
    assert json.load(open(new / "actcls.json")) == {**json.load(open(source / "actcls.json")), "source": str(source)}


def test_seq_cls_layout_of_a_linear_head(exported, tmp_path):
    """Qwen2.5-VL's seq-cls export: `score` = the head's weight, its bias in actcls.json, the labels at
    both levels of the config, the architecture vLLM maps; the backbone's weights under the names the
    default export (save_pretrained) gives them. actcls and the trust_remote_code code refuse it, naming the form that works."""
    target = exported[0]["lora"][1]
    seq = str(tmp_path / "seq")
    export.main(["--checkpoint", target, "--out", seq, "--dtype", "fp32", "--as", "seq-cls"])  # the base is gone
    config = json.load(open(os.path.join(seq, "config.json")))
    assert config["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
    labels = {str(i): name for i, name in enumerate(CLASSES)}
    for level in (config, config["text_config"]):
        assert level["id2label"] == labels and level["label2id"] == {n: i for i, n in enumerate(CLASSES)}
    weights, full = load_file(os.path.join(seq, "model.safetensors")), load_file(os.path.join(target, "model.safetensors"))
    head = ActionDecoder.from_pretrained(os.path.join(target, "heads", "default"))
    assert torch.equal(weights.pop("score.weight"), head.net.weight)
    assert json.load(open(os.path.join(seq, "actcls.json")))["score_bias"] == head.net.bias.tolist()
    assert weights.keys() == full.keys() - {"lm_head.weight"}  # the same names (tied: lm_head is the table)
    assert all(torch.equal(weights[k], full[k]) for k in weights)
    with pytest.raises(Exception, match="seq-cls export .* without --as"):
        VideoClassifier.from_pretrained(seq, "cpu")
    with pytest.raises(modeling_actcls.ExportError, match="seq-cls export: .* without --as"):
        modeling_actcls.read_manifest(seq)


@pytest.mark.parametrize("change, message", [
    ({"action_decoder_type": "mlp"}, "its head is `mlp`, and the seq-cls layout holds a linear head only"),
    ({"label_spaces": {"extra": 3}}, "has 2 heads \\(default, extra\\), and the seq-cls layout holds one")])
def test_seq_cls_refuses_what_its_layout_cannot_hold(exported, tmp_path, change, message):
    """Said before any weight loads, naming the export form that works instead."""
    checkpoint = tmp_path / "step_0000001"
    shutil.copytree(exported[0]["lora"][0], checkpoint)
    raw = yaml.safe_load(open(checkpoint / "config.yaml"))
    yaml.safe_dump({**raw, **change}, open(checkpoint / "config.yaml", "w"))
    with pytest.raises(SystemExit, match=message) as err:
        export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--as", "seq-cls"])
    assert "the default form" in str(err.value) and "trust_remote_code" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_the_export_code_agrees_with_the_project():
    """modeling_actcls.py cannot import the project's constants (it runs without the project)."""
    assert modeling_actcls.EXPORT_FORMAT == checkpoint.EXPORT_FORMAT
    assert modeling_actcls.EXPORT_FILE == checkpoint.EXPORT_FILE
    assert modeling_actcls.VIDEO_EXTENSIONS == inference.VIDEO_EXTENSIONS
    assert modeling_actcls.DTYPES == inference.DTYPES


def test_an_export_of_another_format_is_refused(tmp_path):
    (tmp_path / "actcls.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(modeling_actcls.ExportError, match="export format 99, this code reads 1; export the checkpoint again"):
        modeling_actcls.read_manifest(str(tmp_path))
    with pytest.raises(modeling_actcls.ExportError, match="no actcls.json, so not an actcls export"):
        modeling_actcls.read_manifest(str(tmp_path / "nothing"))

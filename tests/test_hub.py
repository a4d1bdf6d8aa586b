"""Issue 21: the seq-cls layout under plain transformers. For Qwen3.5, transformers'
AutoModelForSequenceClassification.from_pretrained(export) (Qwen3_5ForSequenceClassification: the
last non-pad token through a bias-free `score`) gives actcls's logits once the head's bias
(actcls.json's `score_bias`) is added. The trust_remote_code form is tested in test_export.py."""

import json
import os

import torch
from transformers import AutoModelForSequenceClassification

import export
from config import Config, video_settings
from data import Collator, Sample, VideoDataset
from evaluation import eval_views
from inference import VideoClassifier
from model import build_classifier, vision_geometry
from prepare.records import DEFAULT_MESSAGES
from prepare.synthetic import CLASSES

FP32_TOL = 1e-5  # merged vs unmerged adapters in fp32, as in test_export.py


def classifier(model_dir):
    """A Qwen3.5 classifier as a trained one looks: adapters away from their zero start, a non-zero
    head bias (so both the merge and the bias matter), without the cost of training."""
    cfg = Config(model_name_or_path=model_dir, video_min_pixels=3136, video_max_pixels=3136)
    torch.manual_seed(0)
    processor, model = build_classifier(cfg, {"default": len(CLASSES)})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "heads.default.net.bias":
                p.normal_(0, 0.05)
    return VideoClassifier(model.eval(), processor, {"default": CLASSES}, video_settings(cfg, vision_geometry(processor)),
                           eval_views(cfg), DEFAULT_MESSAGES, False, torch.device("cpu"))


def test_qwen3_5_sequence_classification_gives_actcls_logits(tiny_family_model_dir, synthetic_dir, tmp_path):
    clf = classifier(tiny_family_model_dir("qwen3_5"))
    longer = [{"role": "user", "content": "<video>Watch closely. What action is being performed in this video?"},
              DEFAULT_MESSAGES[1]]  # prompts of two lengths: rows padded on the right, pooled at their own <ACT>
    videos = sorted(os.listdir(os.path.join(synthetic_dir, "videos")))[-2:]
    samples = [Sample(os.path.join(synthetic_dir, "videos", v), m, None, "default", v)
               for v, m in zip(videos, [DEFAULT_MESSAGES, longer])]
    dataset = VideoDataset(samples, clf.settings)
    batch = Collator(clf.processor, clf.model.act_token_id)([dataset[(i, 0, False)] for i in range(len(samples))])
    assert not batch.inputs["attention_mask"].all()  # the padding case is covered
    with torch.no_grad():
        reference = clf.model("default", **batch.inputs).float()

    folder = str(tmp_path / "seq")
    os.makedirs(folder)
    export.write_seq_cls_files(clf, folder, "fp32", "in-memory")  # what export.py --as seq-cls writes
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "Qwen3_5ForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.get_text_config().num_labels == 6
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.inputs.items() if k != "act_index"}).logits.float()
    bias = torch.tensor(json.load(open(os.path.join(folder, "actcls.json")))["score_bias"])
    diff = (logits + bias - reference).abs().max().item()
    prob_diff = ((logits + bias).softmax(-1) - reference.softmax(-1)).abs().max().item()
    dropped = (logits.softmax(-1) - reference.softmax(-1)).abs().max().item()
    print(f"Qwen3.5 seq-cls: max |logits + score_bias - actcls| {diff:.3g}, probabilities {prob_diff:.3g}; "
          f"without the bias the probabilities move by up to {dropped:.3g}")
    assert diff <= FP32_TOL and prob_diff <= FP32_TOL
    assert reference.std(0).max() > 1e-3 and bias.abs().max() > 1e-2  # the comparison means something
    # probabilities from vLLM's /classify (softmax of the bias-free logits), corrected as docs/ship.md says
    corrected = logits.softmax(-1) * bias.exp()
    assert (corrected / corrected.sum(-1, keepdim=True) - reference.softmax(-1)).abs().max() <= FP32_TOL


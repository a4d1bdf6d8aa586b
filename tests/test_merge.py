"""merge.py's streamed merge (what export.py writes) equals peft's in-memory merge_and_unload
(model.merged_backbone), tensor for tensor, on the tiny Qwen2.5-VL with configs/synthetic.yaml's
adapters (DoRA on every Linear, a modules_to_save copy of the patch embedding) plus rsLoRA scaling,
written in 10 MB shards (the 151,936-row table alone is 39 MB in fp32, so model.safetensors.index.json
and several files). Plain LoRA (no magnitude) is tests/test_export.py's "lora" export. The adapters
are perturbed at random first: peft starts lora_B at zero, which would merge nothing."""

import os
import time

import torch

from checkpoint import CONFIG_FILE, save_weights
from config import read_command_line, validated_config, write_config
from merge import write_merged_backbone
from model import build_classifier, merged_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 on both sides, the same operations in the same order (B @ A, scaled, added; DoRA's row norms):
# measured 0 (bitwise equal); the bound allows a different matmul kernel's rounding.
TOL = 1e-6
EXTRA = ["--use_rslora", "true"]


def checkpoint_with_random_adapters(model_dir, directory, extra):
    """A checkpoint folder as train.py writes it (config.yaml, trainable.safetensors, heads) and the
    classifier it came from, its trainable tensors moved off their initial values."""
    raw, where = read_command_line(["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path",
                                    model_dir, "--train_datasets", "[{path: unused.jsonl}]", *extra])
    cfg = validated_config(raw, where)
    _, model = build_classifier(cfg, {"default": cfg.num_action_classes})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_weights(model, directory)
    write_config(cfg, os.path.join(directory, CONFIG_FILE))
    return model


def test_streamed_merge_equals_peft_merge_and_unload(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    start = time.perf_counter()
    model = checkpoint_with_random_adapters(tiny_model_dir, str(tmp_path / "checkpoint"), EXTRA)
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"  # a LoRA target: the merge must move it
    base_q_proj = model.vlm.get_base_model().get_parameter(q_proj.replace(".weight", ".base_layer.weight")).clone()
    os.makedirs(tmp_path / "export")  # export.py makes it (and renames it into place)
    _, tied = write_merged_backbone(str(tmp_path / "checkpoint"), str(tmp_path / "export"), torch.float32, "10MB")
    reference, reference_tied = merged_backbone(model)  # peft's merge_and_unload + the <ACT> row
    streamed = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "export"), dtype=torch.float32)
    expected, got = reference.state_dict(), streamed.state_dict()
    assert sorted(got) == sorted(expected) and tied is reference_tied is True
    worst = max((got[name] - expected[name]).abs().max().item() for name in expected)
    print(f"{len(expected)} tensors, max |streamed - merge_and_unload| {worst:.3g}, "
          f"{time.perf_counter() - start:.1f} s")
    assert worst <= TOL
    assert (got[q_proj] - base_q_proj).abs().max() > 1e-3  # the adapters were merged, not skipped
    assert torch.equal(got["model.language_model.embed_tokens.weight"][model.act_token_id], model.act_embedding)
    shards = [n for n in os.listdir(tmp_path / "export") if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(tmp_path / "export" / "model.safetensors.index.json"), shards

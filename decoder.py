"""ActionDecoder: the classification head on the <ACT> hidden state.

Kept in fp32 whatever the backbone's dtype: it is tiny, and its logits feed the loss directly.
`save_pretrained(dir)` writes `action_decoder.safetensors` + `action_decoder.json` (the constructor
arguments), so `ActionDecoder.from_pretrained(dir)` rebuilds it without the training config.
"""

import json
import os

import torch.nn as nn
from safetensors.torch import load_file, save_file

DECODER_TYPES = ("linear", "mlp")


class ActionDecoder(nn.Module):
    def __init__(self, hidden_size, num_classes, decoder_type="linear", mlp_hidden_size=None):
        super().__init__()
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
        self.config = dict(hidden_size=hidden_size, num_classes=num_classes, decoder_type=decoder_type,
                           mlp_hidden_size=mlp_hidden_size)
        if decoder_type == "linear":
            self.net = nn.Linear(hidden_size, num_classes)
        else:
            inner = mlp_hidden_size if mlp_hidden_size is not None else hidden_size
            self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, num_classes))

    def forward(self, hidden):
        # hidden: (B, hidden_size) in the backbone's dtype -> (B, num_classes) fp32 logits
        return self.net(hidden.float())

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "action_decoder.safetensors"))
        with open(os.path.join(directory, "action_decoder.json"), "w") as f:
            json.dump(self.config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory):
        with open(os.path.join(directory, "action_decoder.json")) as f:
            decoder = cls(**json.load(f))
        decoder.load_state_dict(load_file(os.path.join(directory, "action_decoder.safetensors")))
        return decoder

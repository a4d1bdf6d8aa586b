"""ActionDecoder: the classification head on the <ACT> hidden state.

Kept in fp32 whatever the backbone's dtype: it is tiny, and its logits feed the loss directly.
`save_pretrained(dir)` writes `action_decoder.safetensors` + `action_decoder.json` (the constructor
arguments), so `ActionDecoder.from_pretrained(dir)` rebuilds it without the training config.
"""

import json
import os

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DECODER_TYPES = ("linear", "mlp")
WEIGHTS_FILE = "action_decoder.safetensors"  # IVCP's ActionDecoder writes a file of the same name, without the json


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


def ivcp_decoder_type(directory):
    """The head type of an IVCP ActionDecoder.save_pretrained folder (weights only, keys `head.*`, no
    action_decoder.json): "linear", "mlp" or "transformer"; None when the folder holds no such file."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(os.path.join(directory, "action_decoder.json")) or not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    if keys == {"head.weight", "head.bias"}:
        return "linear"
    if keys == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}:
        return "mlp"
    return "transformer"  # projection.*, transformer_layers.*, final_norm.*, head.*


def from_ivcp(directory):
    """An IVCP linear or mlp head as an ActionDecoder: the same layers under `head` instead of `net`
    (Linear, or Linear-GELU-Linear), so only the names change; the sizes come from the weights."""
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    state = {"net" + key[len("head"):]: value for key, value in state.items()}
    if "net.weight" in state:
        num_classes, hidden_size = state["net.weight"].shape
        decoder = ActionDecoder(hidden_size, num_classes, "linear")
    else:
        inner, hidden_size = state["net.0.weight"].shape
        decoder = ActionDecoder(hidden_size, state["net.2.weight"].shape[0], "mlp", inner)
    decoder.load_state_dict(state)
    return decoder

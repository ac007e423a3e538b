"""The DynTS importance head: d -> 2d -> d/2 -> 1, Softplus after each layer, no biases.

Input: the final hidden state (after the last norm, the vector that feeds `lm_head`) of the
token just processed; output: its predicted importance for the answer. Stored as a
safetensors file with tensors `fc1.weight`, `fc2.weight`, `fc3.weight`.

A head loaded for inference (`load_predictor`) on a CPU in float32 runs its three products on
the native fp32 panels where the AVX-512 build of the CPU kernels loaded (`pack`): a decode
step scores a few rows, where `F.linear` costs ~0.15 ms a layer in call overhead (measured on
a 2-core Zen 5 EPYC at 4 rows) and the panels ~0.02. Training keeps `F.linear`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from thinfer.kernels.cpu_panels import f32_panel_matmul, pack_f32_panels, panels_available


class ImportancePredictor(nn.Module):
    """Small MLP on frozen hidden states; one non-negative score per token."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.fc1 = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.fc2 = nn.Linear(2 * hidden_size, hidden_size // 2, bias=False)
        self.fc3 = nn.Linear(hidden_size // 2, 1, bias=False)
        # The weights in fp32 panels (`pack`); None: `F.linear`.
        self._panels: tuple[torch.Tensor, ...] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> scores [...]."""
        if self._panels is not None and hidden.dim() == 2 and hidden.dtype == torch.float32:
            x = hidden
            for layer, panels in zip((self.fc1, self.fc2, self.fc3), self._panels, strict=True):
                x = F.softplus(f32_panel_matmul(x, panels, layer.weight.shape[0], None))
            return x.squeeze(-1)
        x = F.softplus(self.fc1(hidden))
        x = F.softplus(self.fc2(x))
        return F.softplus(self.fc3(x)).squeeze(-1)

    def pack(self) -> bool:
        """Freeze the weights into fp32 panels for inference where they run (CPU, float32,
        the AVX-512 kernel build); returns True if packed. Changing the weights afterwards
        needs another `pack`; training never packs."""
        weights = [layer.weight for layer in (self.fc1, self.fc2, self.fc3)]
        usable = panels_available() and all(
            w.device.type == "cpu" and w.dtype == torch.float32 for w in weights
        )
        self._panels = tuple(pack_f32_panels(w) for w in weights) if usable else None
        return usable


def save_predictor(model: ImportancePredictor, path: str) -> None:
    """Write the head as safetensors."""
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, path)


@functools.lru_cache(maxsize=8)
def load_predictor(path: str, dtype: torch.dtype, device: str) -> ImportancePredictor:
    """Load (once per path, dtype and device) a head saved by `save_predictor`."""
    if not os.path.isfile(path):
        raise ValueError(f"DynTS predictor file does not exist: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    expected = {"fc1.weight", "fc2.weight", "fc3.weight"}
    if set(tensors) != expected:
        raise ValueError(f"{path}: expected tensors {sorted(expected)}, found {sorted(tensors)}")
    hidden_size = tensors["fc1.weight"].shape[1]
    model = ImportancePredictor(hidden_size)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensor shapes do not form a d -> 2d -> d/2 -> 1 head") from e
    model.requires_grad_(False)
    model = model.to(dtype=dtype, device=device).eval()
    model.pack()
    return model

"""Test helpers for the PyTorch parity tests: weights and gradients out of lmlab.torch_reference's
TorchGPT, by lmlab's parameter names. Import only after pytest.importorskip("torch")."""

from __future__ import annotations

import numpy as np
import torch

from lmlab.model import GPT
from lmlab.torch_reference import TorchGPT


def from_lmlab(model: GPT, dtype: torch.dtype = torch.float32) -> TorchGPT:
    """A TorchGPT holding a copy of an lmlab GPT's weights, by name."""
    tm = TorchGPT(model.config).to(dtype)
    named = model.named_parameters()
    with torch.no_grad():
        params = dict(tm.named_parameters())
        if set(params) != set(named):
            raise ValueError(f"parameter names differ: {sorted(set(params) ^ set(named))}")
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.array(named[name])).to(p.dtype))
    return tm


def copy_to_lmlab(tm: TorchGPT, model: GPT) -> None:
    """Copy a TorchGPT's weights into an lmlab GPT, by name."""
    named = model.named_parameters()
    for name, p in tm.named_parameters():
        named[name][...] = p.detach().to(torch.float32).numpy()


def grads_by_name(tm: TorchGPT) -> dict[str, np.ndarray]:
    """Each parameter's .grad as a numpy array (zeros where backward left none)."""
    return {name: (p.grad.detach().numpy() if p.grad is not None
                   else np.zeros(tuple(p.shape)))
            for name, p in tm.named_parameters()}

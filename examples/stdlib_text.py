"""Offline text for the language-model examples: the source of some Python standard-library modules, as bytes.

Read from this Python's own standard library (``inspect.getsource``), so nothing is downloaded; byte-level
tokens (vocab 256) need no tokenizer file.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Iterator, Sequence

import torch

MODULES = ("argparse", "dataclasses", "functools", "textwrap", "json.decoder", "json.encoder", "shlex", "fnmatch")


def stdlib_bytes(modules: Sequence[str] = MODULES) -> torch.Tensor:
    """The source of ``modules``, joined, as byte ids (N,) int64."""
    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def windows(data: torch.Tensor, steps: int, batch: int, length: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of random windows of ``data``, each (batch, length + 1), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + length + 1] for s in start.tolist()])


def held_out_loss(model, held_out: Sequence[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) of a causal LM over ``held_out`` batches of byte ids, in eval mode and
    without gradients; the model is left in train mode."""
    model.eval()
    with torch.no_grad():
        loss = sum(model(ids, labels=ids).loss.item() for ids in held_out) / len(held_out)
    model.train()
    return loss

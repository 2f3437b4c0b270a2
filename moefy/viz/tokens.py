"""Which expert every token of a sequence went to, in every MoE layer of a language model."""
from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import nn

from ..block import MoEBlock
from ..observe.recorder import RoutingRecorder
from ._common import column_colors, column_names


def plot_token_routing(tokens: Sequence[str], model: nn.Module, sample: int = 0) -> Figure:
    """One row per MoE layer, one cell per token: the cell has the colour of the token's first choice
    (the highest-weight expert) in that layer and shows the token's text; a second strip under it shows
    the second choice with ``k ≥ 2``.

    Args:
        tokens: the L token strings of sample ``sample`` of the model's last forward (``route="tokens"``,
            input (B, L, D) or (L, D)).
        model: a model whose MoE blocks all ran that forward (or one block), or the RoutingRecorder that watched
            that forward of a Hugging Face model (its layers' last records).
        sample: which sequence of the batch to draw.
    Returns:
        the figure.
    """
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens) or not tokens:
        raise TypeError("tokens must be a non-empty list of token strings")
    if not isinstance(model, (nn.Module, RoutingRecorder)):
        raise TypeError(f"model must be an nn.Module or a RoutingRecorder, got {type(model).__name__}")
    blocks = list(model.blocks.items()) if isinstance(model, RoutingRecorder) else [
        (n or "model", b) for n, b in model.named_modules() if isinstance(b, MoEBlock)]
    if not blocks:
        raise ValueError("model contains no MoEBlock")
    rows = []
    for name, b in blocks:
        r = b.routing
        if r is None or r.mode != "token_choice" or b.route != "tokens" or r.kept is not None:
            raise ValueError(f"{name}: needs the last forward of a token-choice, per-token block without a "
                             f"token_mask (run the model on the sequence first)")
        flat = len(r.tokens_shape) == 1  # (T,) rows of a batch the layer flattened: sequences of len(tokens)
        length = len(tokens) if flat and r.tokens_shape[0] % len(tokens) == 0 else r.tokens_shape[-1]
        batch = r.indices.shape[0] // length
        if length != len(tokens) or not 0 <= sample < batch:
            raise ValueError(f"tokens / sample: {name} routed {batch} sequence(s) of {length} tokens, got "
                             f"{len(tokens)} tokens and sample={sample}")
        order = r.weights.argsort(dim=-1, descending=True)                            # (T, k)
        picks = r.indices.gather(1, order).view(batch, length, -1)[sample, :, :2]     # (L, ≤2)
        rows.append((name, b, picks.cpu()))
    width = max(6.0, 0.22 * len(tokens))
    fig = Figure(figsize=(width, 0.55 * len(rows) + 1.0), layout="constrained")
    ax = fig.add_subplot()
    for y, (name, b, picks) in enumerate(rows):
        colors = column_colors(b.num_experts, b.hole, b.config.null_columns)
        for x, token in enumerate(tokens):
            ax.add_patch(Rectangle((x, -y - 0.75), 1, 0.75, color=colors[int(picks[x, 0])], lw=0))
            if picks.shape[1] > 1:
                ax.add_patch(Rectangle((x, -y - 1.0), 1, 0.22, color=colors[int(picks[x, 1])], lw=0))
            ax.text(x + 0.5, -y - 0.38, _visible(token), ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, len(tokens))
    ax.set_ylim(-len(rows), 0)
    ax.set_yticks([-y - 0.5 for y in range(len(rows))], [_short(n) for n, _, _ in rows], fontsize=8)
    ax.set_xticks([])
    b = rows[0][1]
    names = column_names(b.num_experts, b.hole, b.config.null_columns)
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(column_colors(b.num_experts, b.hole,
               b.config.null_columns), names)], loc="outside lower center", ncol=min(len(names), 8), fontsize=8)
    ax.set_title("first choice of every token in every layer (thin strip: second choice)", fontsize=9)
    return fig


def _visible(token: str) -> str:
    return {" ": "·", "\n": "↵", "\t": "→", "$": r"\$"}.get(token, token)  # "$" would start mathtext


def _short(name: str) -> str:
    """``model.layers.3.mlp`` → ``layer 3``."""
    parts = name.split(".")
    return f"layer {parts[parts.index('layers') + 1]}" if "layers" in parts[:-1] else name


"""Which image patches went to which expert: run one image through a patch model and draw, for every
MoEBlock, one panel per expert with the patches it received shown and the others faded.

Token layout. A block that routes ``n`` tokens per image on an ``gh × gw`` patch grid (G = gh·gw patches in
row-major order, as ``einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)")`` or ViT's
``flatten(2)`` produce them) is read as follows:

- ``n == G``: token i is patch i (no CLS token);
- ``G < n < 2G``: the first ``n - G`` tokens are prefix tokens (a CLS token, register tokens) and are not patches;
  pass ``prefix_tokens`` explicitly if the extra tokens sit elsewhere (the ones after ``prefix + G`` are then
  ignored as suffix tokens);
- ``n == 1`` or ``route="samples"``: the block routes the whole image; its expert gets every patch;
- ``1 < n < G`` or ``n ≥ 2G`` (unless ``prefix_tokens`` is given): an error, the block does not see this
  patch grid (wrong ``patch_size``?).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..block import MoEBlock
from ..checks import check_module, check_number
from ..modes import evaluating
from ..routing.record import Routing
from ._common import column_names, new_figure

log = logging.getLogger(__name__)
ImageLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class PatchRouting:
    """Where the patches of one image went in one MoEBlock.

    Attributes:
        name: the block's module name in the model.
        title: the block's ``moe_name``.
        image: (H, W, 3) float in [0, 1], the image as shown.
        patch_size: (ph, pw).
        masks: (P, gh, gw) bool; ``masks[p, i, j]``: panel p received patch (i, j). Panels are the E experts,
            then (with a hole, or with expert choice) one "hole / dropped" panel: patches sent to the hole or
            that no real expert processed.
        panel_names: P names.
        prefix_tokens: tokens before the patches (CLS, registers); ``prefix_routed[p]`` counts how many of
            them panel p received.
        prefix_routed: P ints.
        whole_image: the block routed the whole image as one token.
    """

    name: str
    title: str
    image: np.ndarray
    patch_size: Tuple[int, int]
    masks: np.ndarray
    panel_names: List[str]
    prefix_tokens: int
    prefix_routed: List[int]
    whole_image: bool


def as_image(image: ImageLike) -> Tuple[torch.Tensor, np.ndarray]:
    """An image as ``(model input (1, C, H, W) float32, display (H, W, 3) float in [0, 1])``.

    Accepts (H, W), (H, W, C), (C, H, W) or (1, C, H, W) numpy arrays or tensors, C in {1, 3, 4} (alpha is
    dropped). A 3-D input with C-sized dims at both ends is read as CHW for tensors and HWC for arrays (the
    torch and matplotlib conventions). uint8 is scaled to [0, 1]; floats are given to the model unchanged
    and min-max scaled for display only if they leave [0, 1].
    """
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
            raise TypeError(f"image must hold numbers (uint8 or float), got dtype {image.dtype}")
        t, is_tensor = torch.from_numpy(np.array(image)), False  # a copy: imread arrays are read-only
    elif isinstance(image, torch.Tensor):
        if image.is_complex():
            raise TypeError(f"image must hold real numbers (uint8 or float), got dtype {image.dtype}")
        t, is_tensor = image.detach().cpu(), True
    else:
        raise TypeError(f"image must be a numpy array or torch.Tensor, got {type(image).__name__}")
    if t.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(t.shape)}")
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
        is_tensor = True  # a batch is channels-first
    if t.dim() == 2:
        t = t[None]
    elif t.dim() == 3:
        last, first = t.shape[-1] in (1, 3, 4), t.shape[0] in (1, 3, 4)
        if last and (not first or not is_tensor):
            t = t.permute(2, 0, 1)
        elif not first:
            raise ValueError(f"image must be (H, W), (H, W, C), (C, H, W) or (1, C, H, W) with C in 1, 3, 4; "
                             f"got shape {tuple(image.shape)}")
    else:
        raise ValueError(f"image must be (H, W), (H, W, C), (C, H, W) or (1, C, H, W); got shape "
                         f"{tuple(image.shape)}")
    if t.shape[0] == 4:
        t = t[:3]
    x = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    shown = x.permute(1, 2, 0).numpy().astype(np.float64)
    lo, hi = shown.min(), shown.max()
    if lo < 0 or hi > 1:
        shown = (shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)
    if shown.shape[2] == 1:
        shown = np.repeat(shown, 3, axis=2)
    return x[None].contiguous(), shown


def _patch_size(patch_size) -> Tuple[int, int]:
    ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(ps) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in ps):
        raise ValueError(f"patch_size must be a positive int or (height, width), got {patch_size!r}")
    return ps


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_prefix_tokens(prefix_tokens) -> None:
    if prefix_tokens is not None and not _is_int(prefix_tokens):
        raise TypeError(f"prefix_tokens must be an int >= 0 or None, got {prefix_tokens!r}")


def patch_masks(routing: Routing, grid: Tuple[int, int], prefix_tokens: Optional[int] = None,
                whole_image: bool = False, sample: int = 0):
    """Patch masks of one routing record: ``(masks (P, gh, gw) bool, prefix_routed [P], prefix_tokens)``.

    See the module docstring for how tokens map to patches. ``sample`` picks the image of the batch
    (``tokens_shape[0]`` images; a 1-D ``tokens_shape`` is one image).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing record (block.routing), got {type(routing).__name__}")
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) for g in grid):
        raise TypeError(f"grid must be (rows, columns) of patches, two ints, got {grid!r}")
    if min(grid) < 1:
        raise ValueError(f"grid must be (rows, columns) of patches, both >= 1, got {tuple(grid)}")
    _check_prefix_tokens(prefix_tokens)
    if not _is_int(sample):
        raise TypeError(f"sample must be an int (an image of the batch), got {sample!r}")
    gh, gw = grid
    shape = routing.tokens_shape
    per_image = int(np.prod(shape[1:])) if len(shape) > 1 else routing.num_inputs
    images = routing.num_inputs // per_image
    if not 0 <= sample < images:
        raise ValueError(f"sample must be in [0, {images}), got {sample}")
    e = routing.num_experts  # null experts and the hole share the last panel
    extra_panel = routing.hole or bool(routing.null_columns) or routing.mode == "expert_choice"
    panels = e + int(extra_panel)
    routing.counts  # read: the lists then hold only counted assignments (no non-finite tail; see Routing)
    tok = routing.token_index.cpu().numpy() - sample * per_image
    col = routing.expert_index.cpu().numpy()
    keep = (tok >= 0) & (tok < per_image)
    tok, col = tok[keep], col[keep]
    if whole_image or per_image == 1:
        covered = np.zeros(panels, dtype=bool)
        covered[np.minimum(col, panels - 1)] = True
        if extra_panel and not covered[:e].any():
            covered[-1] = True
        return np.repeat(covered[:, None, None], gh * gw, 1).reshape(panels, gh, gw), [0] * panels, 0
    if prefix_tokens is None:
        prefix_tokens = per_image - gh * gw
        if prefix_tokens >= gh * gw:
            raise ValueError(f"the block routes {per_image} tokens per image, at least twice the {gh}x{gw} = "
                             f"{gh * gw} patches: wrong patch_size for this model? (pass prefix_tokens if "
                             f"{prefix_tokens} prefix tokens are right)")
    if prefix_tokens < 0 or per_image < prefix_tokens + gh * gw:
        raise ValueError(f"the block routes {per_image} tokens per image but the patch grid is {gh}x{gw} = "
                         f"{gh * gw} patches (+ prefix_tokens={prefix_tokens}): wrong patch_size for this model?")
    flat = np.zeros((panels, per_image), dtype=bool)
    flat[np.minimum(col, panels - 1), tok] = True
    if extra_panel:
        flat[-1] |= ~flat[:e].any(axis=0)
    prefix_routed = flat[:, :prefix_tokens].sum(axis=1).tolist()
    masks = flat[:, prefix_tokens: prefix_tokens + gh * gw].reshape(panels, gh, gw)
    return masks, prefix_routed, prefix_tokens


@torch.no_grad()
def route_image(image: ImageLike, model: nn.Module, patch_size: Union[int, Sequence[int]],
                prefix_tokens: Optional[int] = None,
                preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[PatchRouting]:
    """Run ``image`` through ``model`` (in eval mode, restored afterwards) and read every MoEBlock's routing.

    Args:
        image: see :func:`as_image`; H and W must be multiples of the patch size.
        model: takes ``preprocess(x)``, x (1, C, H, W) float32 (uint8 images scaled to [0, 1]).
        patch_size: int or (ph, pw).
        prefix_tokens: tokens before the patches (None: inferred, see the module docstring).
        preprocess: optional callable applied to x before the model (normalisation, layout, ...).
    Returns:
        one :class:`PatchRouting` per MoEBlock that ran, in module order.
    """
    check_module(model, "model")
    _check_prefix_tokens(prefix_tokens)
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be callable (x -> x) or None, got {type(preprocess).__name__}")
    ph, pw = _patch_size(patch_size)
    x, shown = as_image(image)
    h, w = shown.shape[:2]
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of patch_size {ph}x{pw}: crop or resize "
                         f"it to {h // ph * ph}x{w // pw * pw} or {-(-h // ph) * ph}x{-(-w // pw) * pw}")
    blocks = [(n, b) for n, b in model.named_modules() if isinstance(b, MoEBlock)]
    if not blocks:
        raise ValueError("model contains no MoEBlock: no routing to show")
    seen = {}

    def keep_first(name):  # a block called twice (weight sharing) shows its first call
        def hook(block, inputs, output) -> None:
            seen.setdefault(name, block.routing)
        return hook
    hooks = [b.register_forward_hook(keep_first(n)) for n, b in blocks]
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device, param.dtype if param.is_floating_point() else x.dtype)
    try:
        with evaluating(model):  # every submodule's own flag back afterwards
            model(preprocess(x) if preprocess is not None else x)
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for name, block in blocks:
        if name not in seen:
            log.info("MoEBlock %r did not run on the image; skipped", name)
            continue
        whole = block.route == "samples"
        try:
            masks, routed, prefix = patch_masks(seen[name], (h // ph, w // pw), prefix_tokens, whole)
        except ValueError as err:
            raise ValueError(f"block {name or 'model'!r}: {err}") from None
        names = column_names(block.num_experts, False)
        if masks.shape[0] > block.num_experts:
            names.append(("null / " if block.config.null_columns else "") + ("hole / dropped" if block.hole
                                                                               else "dropped"))
        out.append(PatchRouting(name=name or "model", title=block.moe_name, image=shown, patch_size=(ph, pw),
                                masks=masks, panel_names=names, prefix_tokens=prefix, prefix_routed=routed,
                                whole_image=whole or seen[name].num_tokens == 1))
    return out


def compose(image: np.ndarray, mask: np.ndarray, patch_size: Tuple[int, int], fade: float = 0.75) -> np.ndarray:
    """(H, W, 3) image with the patches where ``mask`` (gh, gw) is False blended ``fade`` of the way to
    white."""
    ph, pw = patch_size
    keep = np.repeat(np.repeat(mask, ph, axis=0), pw, axis=1)[..., None]
    return np.where(keep, image, image * (1 - fade) + fade)


def plot_patch_routing(routing: PatchRouting, fade: float = 0.75, max_cols: int = 4) -> Figure:
    """One panel per expert (+ hole / dropped): the patches it received in full colour, the others faded.

    Returns:
        the Figure, ``len(routing.panel_names)`` axes.
    """
    if not isinstance(routing, PatchRouting):
        raise TypeError(f"routing must be a PatchRouting (from route_image), got {type(routing).__name__}")
    check_number(fade, "fade", low=0, high=1, what="in [0, 1]")
    if not _is_int(max_cols) or max_cols < 1:
        raise ValueError(f"max_cols must be a positive int, got {max_cols!r}")
    if not routing.masks.shape[0] == len(routing.panel_names) == len(routing.prefix_routed):
        raise ValueError(f"routing: {routing.masks.shape[0]} masks but {len(routing.panel_names)} panel_names "
                         f"and {len(routing.prefix_routed)} prefix_routed; they must match")
    h, w = routing.image.shape[:2]
    fig, axes = new_figure(len(routing.panel_names), panel_size=(3.0, 3.0 * h / w + 0.4), max_cols=max_cols)
    patches = routing.masks.shape[1] * routing.masks.shape[2]
    for ax, mask, name, pre in zip(axes, routing.masks, routing.panel_names, routing.prefix_routed):
        ax.imshow(compose(routing.image, mask, routing.patch_size, fade))
        cls = ("" if not pre else " + CLS" if routing.prefix_tokens == 1 else f" + {pre} prefix")
        ax.set_title(f"{name}: {int(mask.sum())}/{patches} patches{cls}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    how = "whole image routed as one token" if routing.whole_image else \
        f"{routing.patch_size[0]}x{routing.patch_size[1]} patches"
    fig.suptitle(f"{routing.title} — {how}", fontsize=10)
    return fig


def image_through_experts(image: ImageLike, model: nn.Module, patch_size: Union[int, Sequence[int]],
                          prefix_tokens: Optional[int] = None,
                          preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          fade: float = 0.75) -> List[Figure]:
    """One Figure per MoEBlock of ``model``: the patches of ``image`` each expert received (the original
    MoEfy's function; see :func:`route_image` for the arguments and the module docstring for CLS tokens)."""
    return [plot_patch_routing(r, fade=fade) for r in route_image(image, model, patch_size, prefix_tokens,
                                                                   preprocess)]

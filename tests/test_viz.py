"""Plots: rendered to PNG, not blank, the expected panels, and the patch pictures match the routing."""
import io

import matplotlib.cbook as cbook
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from einops.layers.torch import Rearrange
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

from conftest import LinearMixture
from moefy.observe.log import TrainingLogWriter, read_log
from moefy.observe.recorder import RoutingRecorder
from moefy.viz import (display_abs_experts_load, display_experts_load, image_through_experts, plot_affinity,
                       plot_dashboard, plot_entropy, plot_experts_load, plot_load_heatmap, plot_metrics,
                       plot_patch_routing, plot_routing_accuracy, plot_total_load, plot_utilization, route_image)
from moefy.viz.patches import compose

PATCH = 32


def png(fig, dpi=40) -> np.ndarray:
    """Render ``fig`` to PNG bytes and read them back: (h, w, 4) floats."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return mpimg.imread(buf)


def assert_not_blank(fig, dpi=40):
    pixels = png(fig, dpi)[..., :3]
    assert pixels.std() > 0.05, "the rendered figure is (nearly) one colour"


@pytest.fixture(scope="module")
def photo():
    """Grace Hopper, 600x512 (HxW), cropped to a non-square 480x384 (15x12 patches of 32)."""
    image = plt.imread(cbook.get_sample_data("grace_hopper.jpg"))
    assert image.shape == (600, 512, 3)
    return np.array(image[40:520, 64:448])


class PatchModel(nn.Module):
    """A tiny ViT-like patch model: patches → linear → [CLS] + tokens → two MoE blocks → head."""

    def __init__(self, patch=PATCH, dim=24, cls=False, expert_choice=False, channels=3):
        super().__init__()
        self.embed = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                   nn.Linear(patch * patch * channels, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.moe1 = LinearMixture(dim, dim, 4, k=1, layer_id=1)
        self.moe2 = LinearMixture(dim, dim, 3, k=1, hole=True, layer_id=3, expert_choice=expert_choice)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return self.head(self.moe2(torch.relu(self.moe1(t))).mean(1))


def expected_masks(block, grid, prefix):
    """Masks rebuilt from the routing record's (T, k) / (E', C) indices, independently of patch_masks."""
    r, (gh, gw) = block.routing, grid
    panels = block.num_experts + int(block.hole or block.expert_choice)
    masks = np.zeros((panels, gh, gw), dtype=bool)
    if block.expert_choice:
        taken = {e: set(r.indices[e].tolist()) for e in range(r.indices.shape[0])}
        for t in range(prefix, prefix + gh * gw):
            real = [e for e in range(block.num_experts) if t in taken[e]]
            for e in real:
                masks[(e, *divmod(t - prefix, gw))] = True
            if not real or (block.hole and t in taken[block.num_experts]):
                masks[(-1, *divmod(t - prefix, gw))] = True
        return masks
    for t in range(prefix, prefix + gh * gw):
        for e in r.indices[t].tolist():
            masks[(e, *divmod(t - prefix, gw))] = True
    return masks


@pytest.mark.parametrize("cls", [False, True])
def test_patch_masks_match_routing_record_on_real_photo(photo, cls):
    torch.manual_seed(3)
    model = PatchModel(cls=cls)
    routed = route_image(photo, model, PATCH)
    assert [r.name for r in routed] == ["moe1", "moe2"]
    for r, block in zip(routed, (model.moe1, model.moe2)):
        assert r.prefix_tokens == int(cls) and r.masks.shape[1:] == (15, 12)
        assert block.routing.num_tokens == 15 * 12 + int(cls)
        np.testing.assert_array_equal(r.masks, expected_masks(block, (15, 12), int(cls)))
        # token choice k=1: every patch is in exactly one panel; the CLS token is counted apart
        assert (r.masks.sum(axis=0) == 1).all()
        assert sum(r.prefix_routed) == int(cls)
        assert r.masks.any(axis=(1, 2)).sum() >= 2, "a degenerate routing would not test much"


def test_patch_panels_show_exactly_the_routed_patches_in_pixels(photo):
    torch.manual_seed(3)
    model = PatchModel(cls=True)
    r = route_image(photo, model, PATCH)[1]                           # 3 experts + hole
    image = photo / 255.0
    fig = plot_patch_routing(r)
    assert len(fig.axes) == 4 and r.panel_names[-1] == "hole / dropped"
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    height = pixels.shape[0]
    decided = 0
    for ax, mask in zip(fig.axes, r.masks):
        # the drawn array: routed patches are the photo, the others faded, patch for patch
        drawn = np.asarray(ax.images[0].get_array())
        np.testing.assert_allclose(drawn, compose(image, mask, (PATCH, PATCH)))
        box = ax.get_window_extent()
        ph, pw = box.height / 15, box.width / 12
        for (i, j), routed in np.ndenumerate(mask):
            y0, x0 = height - box.y1 + i * ph, box.x0 + j * pw                 # display y runs upwards
            shown = pixels[int(y0 + ph / 4): int(y0 + 3 * ph / 4), int(x0 + pw / 4): int(x0 + 3 * pw / 4)]
            src = image[i * PATCH + 8: i * PATCH + 24, j * PATCH + 8: j * PATCH + 24]
            full, faded = src.mean(axis=(0, 1)), (src * 0.25 + 0.75).mean(axis=(0, 1))
            if np.abs(full - faded).mean() < 0.1:
                continue                                              # a near-white patch looks the same faded
            decided += 1
            got = shown.mean(axis=(0, 1))
            closer_to_full = np.abs(got - full).mean() < np.abs(got - faded).mean()
            assert closer_to_full == routed, f"panel {ax.get_title()!r}, patch ({i}, {j})"
    assert decided >= 0.8 * r.masks.size


def test_image_through_experts_panels_layouts_and_no_pyplot(photo):
    torch.manual_seed(0)
    model = PatchModel(cls=True)
    plt.close("all")
    figs = image_through_experts(photo, model, PATCH)
    assert [len(f.axes) for f in figs] == [4, 4] and plt.get_fignums() == []
    for f in figs:
        assert_not_blank(f)
    hwc = route_image(photo, model, PATCH)
    chw = route_image(torch.from_numpy(photo).permute(2, 0, 1).float() / 255, model, PATCH)
    batch = route_image(torch.from_numpy(photo).permute(2, 0, 1)[None], model, (PATCH, PATCH))
    for a, b, c in zip(hwc, chw, batch):
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.masks, c.masks)
        np.testing.assert_allclose(a.image, b.image, atol=1e-6)
    assert model.training, "route_image restores the training mode"


def test_expert_choice_dropped_panel_and_grayscale_image(photo):
    torch.manual_seed(0)
    model = PatchModel(expert_choice=True, channels=1)
    gray = photo.mean(axis=2).astype(np.float32) / 255                 # (H, W)
    r = route_image(gray, model, PATCH)[1]
    assert r.panel_names == ["expert 0", "expert 1", "expert 2", "hole / dropped"]
    np.testing.assert_array_equal(r.masks, expected_masks(model.moe2, (15, 12), 0))
    uncovered = ~r.masks[:3].any(axis=0)
    assert uncovered.sum() == int(model.moe2.routing.dropped) > 0 and r.masks[-1][uncovered].all()


def test_whole_image_routing_and_bad_inputs(photo):
    class SampleExperts(LinearMixture):
        def expert_forward(self, expert, x):
            return x

    model = nn.Sequential(Rearrange("b c h w -> b (h w) c"), SampleExperts(3, 3, 2, route="samples"))
    (r,) = route_image(photo, model, PATCH)
    assert r.whole_image and r.masks.sum(axis=(1, 2)).tolist() in ([180, 0], [0, 180])
    with pytest.raises(ValueError, match=r"image size 470x384 \(HxW\) is not a multiple of patch_size 32x32"):
        route_image(photo[:470], PatchModel(), PATCH)
    with pytest.raises(ValueError, match="wrong patch_size"):
        route_image(photo, PatchModel(patch=16), PATCH)             # 720 tokens on a grid of 180
    with pytest.raises(ValueError, match="wrong patch_size"):
        route_image(photo, PatchModel(patch=PATCH), 16)               # 180 tokens < 720 patches
    with pytest.raises(ValueError, match=r"image must be"):
        route_image(np.zeros((2, 2, 32, 32)), PatchModel(), PATCH)
    with pytest.raises(TypeError, match="image must be a numpy array"):
        route_image([[0.0]], PatchModel(), PATCH)


def test_load_plots_bars_equal_counts():
    block = LinearMixture(8, 8, 3, k=2, hole=True, layer_id=2).eval()
    block(torch.randn(6, 10, 8))
    load = block.experts_load()
    for fig in (plot_experts_load(block), display_experts_load(block, load)):
        assert len(fig.axes) == 4
        for ax, row in zip(fig.axes, load):
            assert [p.get_height() for p in ax.patches] == row.tolist()
        assert_not_blank(fig)
    fig = display_abs_experts_load(block)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert len(fig.axes) == 1 and heights == list(block.routing.counts) and sum(heights) == 60 * 2
    assert plot_total_load(block, load).axes[0].patches[0].get_height() == load[0].sum()
    assert_not_blank(fig)
    with pytest.raises(ValueError, match="expert_loads must have shape"):
        plot_experts_load(block, torch.zeros(3, 10))


def test_load_heatmap_layers_by_experts():
    model = nn.Sequential(LinearMixture(4, 4, 4, layer_id=0), LinearMixture(4, 4, 2, hole=True, layer_id=1))
    model(torch.randn(50, 4))
    fig = plot_load_heatmap(model)
    grid = fig.axes[0].images[0].get_array()
    c0, c1 = model[0].routing.counts, model[1].routing.counts
    np.testing.assert_allclose(grid[0].filled(np.nan), [*(c / 50 for c in c0), np.nan])
    np.testing.assert_allclose(grid[1].filled(np.nan), [c1[0] / 50, c1[1] / 50, np.nan, np.nan, c1[2] / 50])
    assert len(fig.axes) == 2  # heatmap + colourbar
    assert_not_blank(fig)
    with RoutingRecorder(model) as rec:
        model(torch.randn(30, 4))
        model(torch.randn(20, 4))
    grid = plot_load_heatmap(rec).axes[0].images[0].get_array()
    assert grid[0, :4].sum() == pytest.approx(1.0) and rec.stats["0"].tokens == 50
    with pytest.raises(ValueError, match="not run a forward"):
        plot_load_heatmap(nn.Sequential(LinearMixture(4, 4, 2)))


def test_dashboard_plots_from_a_log(tmp_path):
    model = nn.Sequential(LinearMixture(4, 4, 3, layer_id=0), LinearMixture(4, 4, 2, hole=True, layer_id=1))
    with TrainingLogWriter(tmp_path / "log.jsonl") as writer, RoutingRecorder(model) as rec:
        for epoch in range(1, 4):
            rec.reset()
            rec.labels = torch.arange(12) % 3
            model(torch.randn(12, 4))
            writer.write(epoch, rec, {"loss": 1 / epoch, "accuracy": epoch / 4})
    log = read_log(tmp_path / "log.jsonl")
    panels = {plot_utilization: 2, plot_entropy: 1, plot_routing_accuracy: 1, plot_metrics: 2,
              plot_affinity: 4,                                         # 2 heatmaps + 2 colourbars
              plot_dashboard: 2 + 1 + 1 + 2 + 4}
    for plot, count in panels.items():
        fig = plot(log)
        assert len(fig.axes) == count, plot.__name__
        assert_not_blank(fig)
    util = plot_utilization(log).axes[1]
    assert [l.get_label() for l in util.lines] == ["expert 0", "expert 1", "hole", "balanced"]
    np.testing.assert_allclose(util.lines[2].get_ydata(), [u[2] for u in log.layers["1"].utilization])
    heat = plot_affinity(log).axes[0].images[0].get_array()
    aff = np.array(log.layers["0"].affinity, dtype=float)
    np.testing.assert_allclose(heat, aff / aff.sum(axis=1, keepdims=True))


def test_token_routing_colours_every_token_by_its_first_and_second_choice():
    from matplotlib.colors import to_rgba
    from moefy.viz import plot_token_routing
    from moefy.viz._common import column_colors
    torch.manual_seed(0)
    model = nn.Sequential(LinearMixture(6, 6, 4, k=2, layer_id=0), LinearMixture(6, 6, 3, k=2, layer_id=1))
    model(torch.randn(2, 5, 6))
    tokens = list("ab$ d")
    fig = plot_token_routing(tokens, model, sample=1)
    patches = fig.axes[0].patches
    assert len(patches) == 2 * len(tokens) * 2  # layers x tokens x (first, second choice)
    for layer, block in enumerate(model):
        order = block.routing.weights.argsort(-1, descending=True)
        picks = block.routing.indices.gather(1, order).view(2, 5, 2)[1]  # sample 1: (L, 2)
        colors = column_colors(block.num_experts, block.hole)
        drawn = patches[layer * 10:(layer + 1) * 10]
        assert [p.get_facecolor() for p in drawn[0::2]] == [to_rgba(colors[int(e)]) for e in picks[:, 0]]
        assert [p.get_facecolor() for p in drawn[1::2]] == [to_rgba(colors[int(e)]) for e in picks[:, 1]]
    fig.canvas.draw()  # "$" is drawn as text, not mathtext


def test_token_routing_reads_a_flat_record_as_sequences_of_the_tokens():
    """A layer that flattened its (B, L) tokens to (B·L,) rows (JetMoE's attention experts) draws sample 1 too."""
    from moefy.viz import plot_token_routing
    torch.manual_seed(0)
    flat, nested = LinearMixture(6, 6, 4, k=2, layer_id=0), LinearMixture(6, 6, 4, k=2, layer_id=0)
    nested.load_state_dict(flat.state_dict())
    x = torch.randn(2, 5, 6)
    flat(x.reshape(10, 6)), nested(x)
    tokens = list("abcde")
    drawn = [[p.get_facecolor() for p in plot_token_routing(tokens, m, sample=1).axes[0].patches] for m in (flat, nested)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 10
    with pytest.raises(ValueError, match="routed 1 sequence"):
        plot_token_routing(list("abc"), flat)  # 10 rows are not sequences of 3 tokens

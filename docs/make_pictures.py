"""Regenerate the pictures in README.md and docs/ from the shipped demo models (seconds, no training):

    python docs/make_pictures.py            # writes docs/images/*.png

The models themselves are rebuilt with ``python -m guided_swap.checks.demo --train [faces|photos]`` (deterministic).
To keep the repository small the PNGs are drawn at 72-90 dpi with 32 levels per colour channel (white stays
white); a palette of 256 colours would band the colour bars.
"""
import io
import os
import sys

import torch

import guided_swap as gs
from guided_swap.checks import demo
from guided_swap.media import viz
from guided_swap._files import atomic_write

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")


def save_small(fig, name: str, dpi: int = 72, levels: int = 32) -> str:
    """The figure as a PNG in docs/images with ``levels`` values per channel (written atomically)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    step = 255 / (levels - 1)
    picture = Image.open(buffer).convert("RGB").point(lambda v: int(round(round(v / step) * step)))
    path = os.path.join(IMAGES, name)
    with atomic_write(path, suffix=".png") as temporary:
        picture.save(temporary, format="png", optimize=True)
    return path


def demo_figure():
    """The README picture: the faces demo, every map (what ``guided-swap demo`` writes)."""
    model, x, truth = demo.load_demo()
    stats = demo.checkpoint()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    return viz.figure(ex.explain(x), x, explainer=ex, labels=list(demo.CLASSES), mean=(stats["mean"],),
                      std=(stats["std"],), notes=[f"true: {label}" for label in truth])


def rules_figure(rows=(0, 1, 4, 5)):
    """The three backward rules side by side on faces-demo images, one shared colour range per rule."""
    from matplotlib.figure import Figure

    model, x, _ = demo.load_demo()
    stats = demo.checkpoint()
    x = x[list(rows)]
    rules = ("gradient", "deconvnet", "guided")
    explainers = {rule: gs.convert(model, layer=None, rule=rule) for rule in rules}
    maps = {rule: ex.explain(x).gradient for rule, ex in explainers.items()}
    fig = Figure(figsize=(11, 2.4 * len(x)), layout="constrained")
    axes = fig.subplots(len(x), 1 + len(rules), squeeze=False)
    for i in range(len(x)):
        picture = viz.denormalize(x[i], (stats["mean"],), (stats["std"],))
        axes[i, 0].imshow(picture)
        axes[i, 0].set_title("input", fontsize=9)
        for ax, rule in zip(axes[i, 1:], rules):
            limits = viz.shared_limits([{"gradient": maps[rule]}])["gradient"]
            viz.draw_map(fig, ax, "gradient", maps[rule][i], picture, limits)
            ax.set_title(viz.gradient_title(rule, len(explainers[rule].swapped)), fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def worked_example_figures():
    """The worked example: the four photographs, then the collage explained for each class."""
    model, x, names = demo.load_photos()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    photos = viz.figure(ex.explain(x), x, explainer=ex, labels=names)
    collage = demo.collage().repeat(len(names), 1, 1, 1)
    every_class = ex.explain(collage, torch.arange(len(names)))
    shared = viz.figure(every_class, collage, explainer=ex, labels=names)
    return photos, shared


def renderer_comparison(path: str) -> str:
    """The folder runner's figure before and after: ``viz.figure`` (matplotlib, at the 110 dpi the runner saved
    it) above ``viz.picture`` (numpy and Pillow, what it draws now), the same explanation, 32 levels per channel."""
    from PIL import Image, ImageDraw

    from guided_swap.media import render

    model, x, names = demo.load_photos()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    x = x[:2]
    e = ex.explain(x)
    notes = ["cat.jpg", os.fsdecode(b"$\\alpha$ bad\xff.png")]
    buffer = io.BytesIO()
    viz.figure(e, x, explainer=ex, labels=names, notes=notes).savefig(buffer, dpi=110, format="png")
    before = Image.open(buffer).convert("RGB")
    after = viz.picture(e, x, explainer=ex, labels=names, notes=notes).image
    heads = ["before: viz.figure, a matplotlib figure per image (~370 ms a figure at 224 px)",
             "after: viz.picture, numpy and Pillow (~20 ms a figure at 224 px, PNG included)"]
    band = 28
    canvas = Image.new("RGB", (max(before.width, after.width), 2 * band + before.height + after.height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for head, picture in zip(heads, (before, after)):
        draw.text((8, top + 6), head, font=render._font(16), fill="black")
        canvas.paste(picture, (0, top + band))
        top += band + picture.height
    step = 255 / 31  # 32 levels per channel, as the other pictures here
    canvas = canvas.point(lambda v: int(round(round(v / step) * step)))
    with atomic_write(path, suffix=".png") as temporary:
        canvas.save(temporary, format="png", optimize=True)
    return path


def main() -> int:
    print(save_small(demo_figure(), "demo.png", dpi=80))
    print(save_small(rules_figure(), "rules.png", dpi=90))
    photos, collage = worked_example_figures()
    print(save_small(photos, "worked_example_photos.png"))
    print(save_small(collage, "worked_example_collage.png"))
    print(renderer_comparison(os.path.join(IMAGES, "figure_renderers.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

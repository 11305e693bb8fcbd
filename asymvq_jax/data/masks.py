"""Inpainting masks, float32 [H, W, 1] with 1 = the hole: LaMa's "random_thick" generators and the
training rule.

The generators follow LaMa's configs/data_gen/random_thick_{256,512}.yaml: either 1-6 strokes of
1-5 thick segments with round ends (weight 1), or 1-3 boxes with sides up to 150 (1-4 up to 300 at
512; weight 0.3). LaMa's generator passes max_times + 1 and bbox_max_size + 1 to functions whose
upper bounds are exclusive, hence 6 strokes and sides of 150; the mean hole at 256 px is about
40.3%. At any other size a mask is drawn at its variant's scale (short side 256 or 512) and resized
by nearest neighbour, so the hole statistics do not depend on the output size. `training_mask` is
all ones (plain decoding) with probability all_ones_prob (0.5 in the paper), else a LaMa mask.
Randomness comes only from the Generator passed in; lines are drawn with PIL, not OpenCV.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
from PIL import Image, ImageDraw


@dataclasses.dataclass(frozen=True)
class MaskParams:
    """Parameters of one LaMa "random" mask variant."""

    base_size: int
    # Irregular strokes.
    irregular_weight: float = 1.0
    min_strokes: int = 1
    max_strokes: int = 5   # LaMa's max_times: up to max_strokes + 1 strokes are drawn
    max_segments: int = 5  # segments per stroke: 1 + randint(max_segments)
    max_angle: int = 4
    max_len: int = 200
    max_width: int = 100
    # Boxes.
    box_weight: float = 0.3
    margin: int = 10
    box_min_size: int = 30
    box_max_size: int = 150
    min_boxes: int = 1
    max_boxes: int = 3


# LaMa's configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml.
MASK_VARIANTS: dict[str, MaskParams] = {
    "thin_256": MaskParams(base_size=256, min_strokes=4, max_strokes=50, max_width=10, max_len=40,
                           box_weight=0.0),
    "thin_512": MaskParams(base_size=512, min_strokes=4, max_strokes=70, max_width=20, max_len=100,
                           box_weight=0.0),
    "medium_256": MaskParams(base_size=256, min_strokes=4, max_strokes=5, max_width=50, max_len=100,
                             margin=0, box_min_size=10, box_max_size=50, max_boxes=5),
    "medium_512": MaskParams(base_size=512, min_strokes=4, max_strokes=10, max_width=100, max_len=200,
                             margin=0, box_min_size=30, box_max_size=150, max_boxes=5),
    "thick_256": MaskParams(base_size=256),
    "thick_512": MaskParams(
        base_size=512, max_len=450, max_width=250, box_max_size=300, max_boxes=4
    ),
}


def _params(variant: str | MaskParams) -> MaskParams:
    if isinstance(variant, MaskParams):
        return variant
    # Accept LaMa's names too ("random_thick_256").
    key = variant[len("random_") :] if variant.startswith("random_") else variant
    try:
        return MASK_VARIANTS[key]
    except KeyError:
        raise ValueError(
            f"unknown mask variant {variant!r}; expected one of {sorted(MASK_VARIANTS)}"
        ) from None


class Stream(enum.IntEnum):
    """The input's random streams: each draws from `example_rng(seed, tag, ...)` with its own tag,
    so no two draw the same numbers."""
    PERM, CROP, MASK, RETRY, HELD_OUT_CROP, HELD_OUT_MASK, AUGMENT = 1, 2, 3, 4, 5, 6, 7
    EVAL_MASK = 11
    TFDS_EPOCH = 101


def example_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of non-negative integer `keys`."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _draw_canvas_shape(height: int, width: int, base: int) -> tuple[int, int]:
    short = min(height, width)
    if short == base:
        return height, width
    scale = base / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def irregular_mask(
    rng: np.random.Generator, height: int, width: int, p: MaskParams
) -> np.ndarray:
    """LaMa irregular strokes drawn directly on a `height x width` canvas -> uint8 {0,1}."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    n_strokes = int(rng.integers(p.min_strokes, p.max_strokes + 2))  # LaMa's max_times + 1, inclusive
    for i in range(n_strokes):
        x = int(rng.integers(width))
        y = int(rng.integers(height))
        for _ in range(1 + int(rng.integers(p.max_segments))):
            angle = 0.01 + int(rng.integers(p.max_angle))
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = 10 + int(rng.integers(p.max_len))
            brush = 5 + int(rng.integers(p.max_width))
            ex = int(np.clip(int(x + length * math.sin(angle)), 0, width))
            ey = int(np.clip(int(y + length * math.cos(angle)), 0, height))
            # Thick line with round caps: a line of the given width plus a disc of the
            # same diameter at both ends.
            draw.line([(x, y), (ex, ey)], fill=1, width=brush)
            r = brush / 2.0
            for cx, cy in ((x, y), (ex, ey)):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
            x, y = ex, ey
    return np.asarray(img, dtype=np.uint8)


def box_mask(
    rng: np.random.Generator, height: int, width: int, p: MaskParams
) -> np.ndarray:
    """LaMa random boxes on a `height x width` canvas -> uint8 {0,1}."""
    m = np.zeros((height, width), np.uint8)
    # LaMa's bbox_max_size + 1, as an exclusive bound: sides up to box_max_size.
    max_size = min(p.box_max_size + 1, height - 2 * p.margin, width - 2 * p.margin)
    if max_size <= p.box_min_size:  # canvas too small for the margins: no boxes
        return m
    for _ in range(int(rng.integers(p.min_boxes, p.max_boxes + 1))):
        bw = int(rng.integers(p.box_min_size, max_size))
        bh = int(rng.integers(p.box_min_size, max_size))
        x0 = int(rng.integers(p.margin, width - p.margin - bw + 1))
        y0 = int(rng.integers(p.margin, height - p.margin - bh + 1))
        m[y0 : y0 + bh, x0 : x0 + bw] = 1
    return m


def lama_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    variant: str | MaskParams = "thick_256",
) -> np.ndarray:
    """One LaMa "random_thick" mask, float32 `[height, width, 1]`, 1 = hole.

    Drawn at the variant's scale (short side = base size) and resized with nearest
    neighbour when the requested size differs (see the module docstring).
    """
    p = _params(variant)
    ch, cw = _draw_canvas_shape(height, width, p.base_size)
    w_irr, w_box = p.irregular_weight, p.box_weight
    use_box = rng.random() * (w_irr + w_box) >= w_irr
    m = box_mask(rng, ch, cw, p) if use_box else irregular_mask(rng, ch, cw, p)
    if (ch, cw) != (height, width):
        m = np.asarray(
            Image.fromarray(m).resize((width, height), Image.NEAREST), dtype=np.uint8
        )
    return m.astype(np.float32)[..., None]


def training_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    variant: str | MaskParams = "thick_256",
    all_ones_prob: float = 0.5,
) -> np.ndarray:
    """The paper's training mask: all ones with prob. `all_ones_prob`, else LaMa."""
    if rng.random() < all_ones_prob:
        return np.ones((height, width, 1), np.float32)
    return lama_mask(rng, height, width, variant)

"""A built-in image-caption dataset that needs no download.

Every sample is rendered on the fly from ``(seed, split, index)``: one coloured
shape (circle, square, triangle, star, cross, ...) of some size near the centre
(how near: ``position_spread``) on a textured or noisy background, with a
caption that names it in one of many sentence forms ("a photo of a small red
circle", "red circle on a striped background", ...). Any index is reproducible and no files are written.

The class of a sample is its (colour, shape) pair; ``classnames`` and
``templates`` give the zero-shot classifier prompts. The held-out split draws
from a different random stream (the split is part of the seed), so its
positions, sizes, backgrounds, colour jitter and noise are new samples, never
the training images.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from .transforms import normalize_array

SPLITS = {"train": 0, "val": 1, "test": 2}

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 35),
    "purple": (140, 55, 195),
    "orange": (245, 130, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (245, 120, 190),
    "cyan": (40, 210, 225),
}

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")

BACKGROUNDS = ("plain", "noisy", "striped", "checkered", "gradient", "dotted")

SIZES = {"small": (0.20, 0.26), "medium": (0.27, 0.33), "large": (0.34, 0.42)}

CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape}",
    "{colour} {shape} on a {background} background",
    "a {size} {colour} {shape} in the {position}",
    "there is a {colour} {shape} in this picture",
    "an image showing a {colour} {shape}",
    "a {shape} that is {colour}",
    "{size} {shape}, {colour}",
    "a drawing of a {colour} {shape} on a {background} background",
    "the {shape} is {colour} and {size}",
    "{colour} {shape}",
    "a {size} {shape} coloured {colour}, {position}",
    "a picture of one {colour} {shape}",
    "a {colour} {shape} sitting in the {position}",
    "{background} background with a {colour} {shape}",
    "this is a {size} {colour} {shape}",
)

ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "an image showing a {}.",
    "a picture of one {}.",
)


def _article(phrase):
    return "an" if phrase[:1] in "aeiou" else "a"


def _fix_articles(text):
    # "a orange" -> "an orange", "a large" stays; only the standalone article changes.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeiou":
            words[i] = "an" if words[i] == "a" else "An"
    return " ".join(words)


@dataclass
class SyntheticConfig:
    """What the synthetic dataset draws. Difficulty knobs: how many colours and
    shapes (the classes are their product), the noise level, the colour jitter."""
    image_size: int = 32
    colours: tuple = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple = ("circle", "square", "triangle", "star", "cross")
    backgrounds: tuple = BACKGROUNDS
    noise_std: float = 8.0          # per-pixel Gaussian noise, in 0..255 units
    colour_jitter: float = 18.0     # per-channel jitter of the shape colour
    background_contrast: float = 45.0
    supersample: int = 4            # shapes are drawn at this factor and box-filtered down
    # How far the centre strays: 0 always the image centre, 1 anywhere the shape fits. The
    # default keeps shapes near the middle, so the tiny CPU model learns them in minutes
    # (the bare flipkern-pretrain reaches 37% zero-shot top-1 at 1, 79% at 0.25).
    position_spread: float = 0.25
    caption_templates: tuple = CAPTION_TEMPLATES
    zeroshot_templates: tuple = ZEROSHOT_TEMPLATES
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.colours = tuple(self.colours)
        self.shapes = tuple(self.shapes)
        for c in self.colours:
            if c not in COLOURS:
                raise ValueError(f"synthetic: unknown colour {c!r}; known: {sorted(COLOURS)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"synthetic: unknown shape {s!r}; known: {list(SHAPES)}")
        if not 0 <= self.position_spread <= 1:
            raise ValueError(f"synthetic: position_spread must be in [0, 1], got {self.position_spread}")
        if self.image_size < 8:
            raise ValueError(f"synthetic: image_size must be >= 8, got {self.image_size}")


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    steps = n * 2 if inner is not None else n
    for k in range(steps):
        a = rot + 2 * math.pi * k / steps - math.pi / 2
        rr = r if (inner is None or k % 2 == 0) else r * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated_rect(cx, cy, w, h, rot):
    c, s = math.cos(rot), math.sin(rot)
    pts = []
    for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h)):
        pts.append((cx + dx * c - dy * s, cy + dx * s + dy * c))
    return pts


def draw_shape_mask(shape, size_px, cx, cy, r, rot, supersample):
    """A float32 [size_px, size_px] coverage mask in [0, 1] of one shape."""
    S = size_px * supersample
    cx, cy, r = cx * supersample, cy * supersample, r * supersample
    img = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        d.polygon(_rotated_rect(cx, cy, r * 0.82, r * 0.82, rot), fill=255)
    elif shape == "diamond":
        d.polygon(_rotated_rect(cx, cy, r * 0.8, r * 0.8, rot + math.pi / 4), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy + r * 0.15, r * 1.05, 3, rot), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, rot), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r * 1.1, 5, rot, inner=0.45), fill=255)
    elif shape == "cross":
        t = r * 0.32
        d.polygon(_rotated_rect(cx, cy, r, t, rot), fill=255)
        d.polygon(_rotated_rect(cx, cy, t, r, rot), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if supersample > 1:
        img = img.resize((size_px, size_px), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng, kind, H, contrast):
    """An [H, H, 3] float32 background in 0..255: a muted base colour plus a texture."""
    base = rng.uniform(70, 185) + rng.uniform(-25, 25, size=3)  # greyish with a tint
    yy, xx = np.mgrid[0:H, 0:H].astype(np.float32)
    if kind == "plain":
        tex = np.zeros((H, H), np.float32)
    elif kind == "noisy":
        tex = rng.normal(0, 0.6, size=(H, H)).astype(np.float32)
    elif kind == "striped":
        period = rng.uniform(3, 7)
        ang = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        u = xx * math.cos(ang) + yy * math.sin(ang)
        tex = np.sign(np.sin(2 * math.pi * u / period + rng.uniform(0, 6.3))).astype(np.float32) * 0.5
    elif kind == "checkered":
        cell = int(rng.integers(3, 7))
        ox, oy = rng.integers(0, cell, size=2)
        tex = ((((xx + ox) // cell) + ((yy + oy) // cell)) % 2).astype(np.float32) - 0.5
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        u = (xx * math.cos(ang) + yy * math.sin(ang)) / H
        tex = (u - u.mean()).astype(np.float32) * 1.2
    elif kind == "dotted":
        period = int(rng.integers(4, 7))
        ox, oy = rng.integers(0, period, size=2)
        tex = ((((xx + ox) % period) < 1.5) & (((yy + oy) % period) < 1.5)).astype(np.float32) - 0.2
    else:
        raise ValueError(f"unknown background {kind!r}")
    tint = rng.uniform(0.6, 1.0, size=3)  # the texture is not quite grey either
    return base[None, None, :] + contrast * tex[:, :, None] * tint[None, None, :]


class SyntheticShapes(torch.utils.data.Dataset):
    """Map-style dataset of (image tensor [3, H, W], caption str).

    ``split``: "train", "val" or "test"; ``num_samples``: the (virtual) length.
    ``sample(i)`` returns everything about sample i (uint8 image, caption, label,
    attributes); ``label(i)`` just the class index.
    """

    def __init__(self, split="train", num_samples=100_000, seed=0, config=None, normalize=True):
        if split not in SPLITS:
            raise ValueError(f"synthetic: split must be one of {list(SPLITS)}, got {split!r}")
        self.split = split
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.config = config or SyntheticConfig()
        self.normalize = normalize
        cfg = self.config
        self.classnames = [f"{c} {s}" for c in cfg.colours for s in cfg.shapes]
        self.templates = list(cfg.zeroshot_templates)

    @property
    def num_classes(self):
        return len(self.classnames)

    def __len__(self):
        return self.num_samples

    def _rng(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic {self.split}: index {index} out of range [0, {self.num_samples})")
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index), 0x5EED])

    def attributes(self, index):
        """The random choices of sample ``index`` (no rendering)."""
        cfg = self.config
        rng = self._rng(index)
        ci = int(rng.integers(len(cfg.colours)))
        si = int(rng.integers(len(cfg.shapes)))
        size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
        lo, hi = SIZES[size_name]
        H = cfg.image_size
        r = rng.uniform(lo, hi) * H
        margin = r * 1.05
        reach = max(H / 2 - margin, 0.0) * cfg.position_spread  # how far the centre may move
        cx = H / 2 + rng.uniform(-1, 1) * reach
        cy = H / 2 + rng.uniform(-1, 1) * reach
        rot_range = {"square": 0.2, "diamond": 0.2, "cross": 0.3}.get(cfg.shapes[si], math.pi)
        rot = rng.uniform(-rot_range, rot_range)
        background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
        template = cfg.caption_templates[int(rng.integers(len(cfg.caption_templates)))]
        return dict(rng=rng, colour_index=ci, shape_index=si, colour=cfg.colours[ci], shape=cfg.shapes[si],
                    size=size_name, radius=r, cx=cx, cy=cy, rot=rot, background=background, template=template)

    @staticmethod
    def _position_name(cx, cy, H):
        col = "left" if cx < H * 0.4 else "right" if cx > H * 0.6 else "middle"
        row = "top" if cy < H * 0.4 else "bottom" if cy > H * 0.6 else "middle"
        if row == col == "middle":
            return "centre"
        if row == "middle":
            return col
        if col == "middle":
            return row
        return f"{row} {col}"

    def sample(self, index):
        cfg = self.config
        a = self.attributes(index)
        rng = a.pop("rng")
        H = cfg.image_size
        bg = _background(rng, a["background"], H, cfg.background_contrast)
        mask = draw_shape_mask(a["shape"], H, a["cx"], a["cy"], a["radius"], a["rot"], cfg.supersample)
        colour = np.asarray(COLOURS[a["colour"]], np.float32) + rng.uniform(-1, 1, 3) * cfg.colour_jitter
        # a little shading across the shape so it is not a flat stencil
        shade = 1.0 + 0.12 * rng.uniform(-1, 1) * (np.linspace(-1, 1, H, dtype=np.float32)[None, :, None])
        fg = colour[None, None, :] * shade
        img = bg * (1 - mask[..., None]) + fg * mask[..., None]
        img = img + rng.normal(0, cfg.noise_std, size=img.shape)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        position = self._position_name(a["cx"], a["cy"], H)
        caption = a["template"].format(size=a["size"], colour=a["colour"], shape=a["shape"],
                                       background=a["background"], position=position)
        caption = _fix_articles(caption)
        label = a["colour_index"] * len(cfg.shapes) + a["shape_index"]
        return dict(image=img, caption=caption, label=label, position=position,
                    **{k: a[k] for k in ("colour", "shape", "size", "background")})

    def label(self, index):
        a = self.attributes(index)
        return a["colour_index"] * len(self.config.shapes) + a["shape_index"]

    def __getitem__(self, index):
        s = self.sample(index)
        img = s["image"]
        if self.normalize:
            return normalize_array(img), s["caption"]
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), s["caption"]

    def zeroshot_prompts(self):
        """[num_classes][num_templates] prompt strings."""
        return [[_fix_articles(t.format(c)) for t in self.templates] for c in self.classnames]

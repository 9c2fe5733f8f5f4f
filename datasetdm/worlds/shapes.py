"""The procedural shapes world: images whose every annotation is known exactly.

A scene is 1..N flat coloured shapes on a textured ground plane. Objects stand at
distinct depths and occlude farther ones; size shrinks with depth (with +-10% jitter,
so size is a depth cue, not a rule). From the same
geometry we render the RGB image, a semantic mask, per-object visible instance
masks, a metric depth map and COCO-style keypoints, so the labels are exact by
construction. Everything is a pure function of ``(WorldConfig, seed)``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from datasetdm.config import WorldConfig

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
PLURAL: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "hexagon": "hexagons",
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "a", "two", "three", "four", "five", "six")
# Keypoint names per shape (COCO: each category lists its own keypoints).
KEYPOINT_NAMES: dict[str, tuple[str, ...]] = {
    "circle": ("centre", "top", "right", "bottom", "left"),
    "square": ("centre", "corner1", "corner2", "corner3", "corner4"),
    "triangle": ("centre", "corner1", "corner2", "corner3"),
    "star": ("centre", "tip1", "tip2", "tip3", "tip4", "tip5"),
    "hexagon": ("centre", "corner1", "corner2", "corner3", "corner4", "corner5", "corner6"),
}
NEAR_DEPTH, FAR_DEPTH = 2.0, 5.0  # metres, object range
GROUND_NEAR, GROUND_FAR = 6.0, 10.0  # metres, ground plane bottom / top row


@dataclass(frozen=True)
class ShapeObject:
    """One object's geometry in pixel units (centre, circumradius, rotation in radians)."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    rotation: float
    depth: float

    def outline(self) -> list[tuple[float, float]]:
        """Polygon vertices of the outline (a circle is a 48-gon)."""
        return [(self.cx + x, self.cy + y) for x, y in _unit_outline(self.shape, self.rotation, self.radius)]

    def keypoints(self) -> list[tuple[float, float]]:
        """Centre first, then the shape's corners / tips / compass points."""
        pts = [(self.cx, self.cy)]
        if self.shape == "circle":
            r = self.radius
            pts += [(self.cx, self.cy - r), (self.cx + r, self.cy), (self.cx, self.cy + r), (self.cx - r, self.cy)]
        else:
            corners = _corners(self.shape, self.rotation, self.radius)
            pts += [(self.cx + x, self.cy + y) for x, y in corners]
        return pts


@dataclass
class Scene:
    """A rendered scene and all its exact labels.

    ``semantic`` holds 0 for background and ``1 + classes.index(shape)``;
    ``instances`` is (N, H, W) bool of *visible* pixels, ordered like ``objects``;
    ``depth`` is float32 metres; ``keypoints[i]`` is (K_shape, 3) float32 ``x, y, v``
    with COCO visibility (0 outside the image, 1 occluded, 2 visible).
    """

    image: np.ndarray
    caption: str
    objects: list[ShapeObject]
    semantic: np.ndarray
    instances: np.ndarray
    depth: np.ndarray
    keypoints: list[np.ndarray]


def _corners(shape: str, rotation: float, radius: float) -> list[tuple[float, float]]:
    n = {"square": 4, "triangle": 3, "star": 5, "hexagon": 6}[shape]
    start = rotation - math.pi / 2
    return [
        (radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _unit_outline(shape: str, rotation: float, radius: float) -> list[tuple[float, float]]:
    if shape == "circle":
        return [(radius * math.cos(2 * math.pi * k / 48), radius * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if shape == "star":
        pts = []
        start = rotation - math.pi / 2
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = start + math.pi * k / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    return _corners(shape, rotation, radius)


def caption_for(objects: list[tuple[str, str]]) -> str:
    """Canonical caption for (shape, colour) pairs: "a red circle and two blue squares".

    Groups are ordered by shape then colour name so the same set of objects always
    yields the same caption, whatever order they were placed in.
    """
    counts = Counter(objects)
    parts = []
    for (shape, colour), n in sorted(counts.items()):
        noun = shape if n == 1 else PLURAL[shape]
        parts.append(f"{NUMBER_WORDS[n]} {colour} {noun}")
    return " and ".join(parts)


def random_layout(cfg: WorldConfig, rng: np.random.Generator, max_objects: int | None = None) -> list[tuple[str, str]]:
    """Draw 1..max_objects (shape, colour) pairs uniformly from the world vocabulary."""
    n = int(rng.integers(1, (max_objects or cfg.max_objects) + 1))
    return [(str(rng.choice(cfg.classes)), str(rng.choice(cfg.colours))) for _ in range(n)]


def render_scene(cfg: WorldConfig, seed: int, layout: list[tuple[str, str]] | None = None) -> Scene:
    """Render one scene. ``layout`` fixes which objects appear; otherwise it is drawn."""
    rng = np.random.default_rng(seed)
    if layout is None:
        layout = random_layout(cfg, rng)
    size = cfg.image_size
    image = _background(size, rng)
    ground = _ground_depth(size, rng)

    depths = _distinct_depths(len(layout), rng)
    objects: list[ShapeObject] = []
    for (shape, colour), depth in zip(layout, depths):
        objects.append(_place(cfg, shape, colour, depth, placed=objects, rng=rng))

    # Paint far to near so nearer objects occlude.
    order = sorted(range(len(objects)), key=lambda i: -objects[i].depth)
    owner = np.full((size, size), -1, dtype=np.int64)
    full_masks = []
    for i in range(len(objects)):
        full_masks.append(_polygon_mask(objects[i].outline(), size))
    for i in order:
        owner[full_masks[i]] = i
    semantic = np.zeros((size, size), dtype=np.uint8)
    depth = ground.copy()
    instances = np.zeros((len(objects), size, size), dtype=bool)
    for i, obj in enumerate(objects):
        vis = owner == i
        instances[i] = vis
        semantic[vis] = 1 + cfg.classes.index(obj.shape)
        depth[vis] = obj.depth
        rgb = np.clip(np.array(COLOUR_RGB[obj.colour]) + rng.integers(-12, 13, size=3), 0, 255)
        # A gentle vertical shade makes the shapes look lit rather than pasted on.
        shade = 1.0 - 0.15 * (np.arange(size)[:, None] - (obj.cy - obj.radius)) / (2 * obj.radius + 1e-6)
        shade = np.clip(shade, 0.8, 1.0)[:, :, None].repeat(size, axis=1)
        image[vis] = np.clip(rgb[None, :] * shade[vis], 0, 255).astype(np.uint8)

    keypoints = [_keypoints(obj, instances[i], size) for i, obj in enumerate(objects)]
    return Scene(
        image=image,
        caption=caption_for(layout),
        objects=objects,
        semantic=semantic,
        instances=instances,
        depth=depth.astype(np.float32),
        keypoints=keypoints,
    )


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted, low-contrast texture so objects are never trivially segmentable by colour."""
    base = rng.uniform(90, 170) + rng.uniform(-20, 20, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(0, 4))
    if kind == 0:  # stripes
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(4, 10)
        tex = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    elif kind == 1:  # checker
        n = int(rng.integers(3, 8))
        tex = ((np.floor(xx * n) + np.floor(yy * n)) % 2) * 2 - 1
    elif kind == 2:  # smooth blobs
        small = rng.normal(size=(5, 5))
        tex = np.asarray(Image.fromarray(small.astype(np.float32)).resize((size, size), Image.BICUBIC))
        tex = tex / (np.abs(tex).max() + 1e-6)
    else:  # gradient
        tex = (yy - 0.5) * 2
    amp = rng.uniform(8, 22)
    noise = rng.normal(0, 3, size=(size, size, 1))
    img = base[None, None, :] + amp * tex[:, :, None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _ground_depth(size: int, rng: np.random.Generator) -> np.ndarray:
    """A tilted ground plane: far at the top row, near at the bottom row."""
    far = GROUND_FAR + rng.uniform(-1, 1)
    near = GROUND_NEAR + rng.uniform(-0.5, 0.5)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    tilt = rng.uniform(-0.5, 0.5) * np.linspace(-1, 1, size, dtype=np.float32)[None, :]
    return (far + (near - far) * t + tilt).astype(np.float32)


def _distinct_depths(n: int, rng: np.random.Generator, gap: float = 0.3) -> list[float]:
    while True:
        d = sorted(rng.uniform(NEAR_DEPTH, FAR_DEPTH, size=n))
        if all(b - a >= gap for a, b in zip(d, d[1:])):
            return [float(x) for x in rng.permutation(d)]


def _place(
    cfg: WorldConfig, shape: str, colour: str, depth: float, *, placed: list[ShapeObject], rng: np.random.Generator
) -> ShapeObject:
    """Place an object; nearer tends to be larger. Retries keep heavy overlaps rare."""
    size = cfg.image_size
    frac = (depth - NEAR_DEPTH) / (FAR_DEPTH - NEAR_DEPTH)
    radius = size * (cfg.max_size + (cfg.min_size - cfg.max_size) * frac) * rng.uniform(0.9, 1.1)
    best: ShapeObject | None = None
    best_overlap = math.inf
    for _ in range(20):
        cx = rng.uniform(radius * 0.8, size - radius * 0.8)
        cy = rng.uniform(radius * 0.8, size - radius * 0.8)
        obj = ShapeObject(
            shape, colour, float(cx), float(cy), float(radius), float(rng.uniform(0, 2 * math.pi)), depth
        )
        overlap = max((1 - math.dist((cx, cy), (o.cx, o.cy)) / (radius + o.radius) for o in placed), default=0.0)
        if overlap < best_overlap:
            best, best_overlap = obj, overlap
        if overlap < 0.35:
            break
    assert best is not None
    return best


def _polygon_mask(points: list[tuple[float, float]], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _keypoints(obj: ShapeObject, visible: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(KEYPOINT_NAMES[obj.shape]), 3), dtype=np.float32)
    for k, (x, y) in enumerate(obj.keypoints()):
        if not (0 <= x < size and 0 <= y < size):
            continue  # COCO: unlabelled points are (0, 0, 0)
        xi, yi = int(x), int(y)
        win = visible[max(yi - 1, 0) : yi + 2, max(xi - 1, 0) : xi + 2]
        out[k] = (x, y, 2 if win.any() else 1)
    return out

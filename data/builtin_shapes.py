"""`builtin:shapes`: procedurally drawn images of one coloured shape on a plain background, with captions.

    spec = shape_spec(7)                 # the 7th image's attributes, the same on every machine
    spec.caption                         # 'a large red circle in the top left on a white background'
    image = draw_shape(spec, 64)         # PIL RGB image, 64 x 64
    for index, spec in shape_specs("validation"): ...   # an endless stream of one split

Each image shows one shape (SHAPES) in one colour of PALETTE, of one of three sizes (SIZES: its circumscribed
circle's diameter as a fraction of the image side), centred in one cell of a 3 x 3 grid (POSITIONS), slightly
rotated, on a background of another palette colour. The attributes are kept with each image (`attributes()`),
so a later script can check a generated image against its prompt (e.g. its dominant shape colour).

Image i is drawn from a generator seeded with "builtin:shapes/i". It belongs to the validation split when a
hash of its attributes falls below VALIDATION_FRACTION, so the two splits never share an image and never change.
Shapes are drawn at SUPERSAMPLE times the size and downsampled with a Lanczos filter (antialiasing).
"""

import dataclasses
import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterator

from PIL import Image, ImageDraw

BUILTIN_SHAPES_NAME = "builtin:shapes"
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
MIN_IMAGE_SIZE = 16
SUPERSAMPLE = 4
MAX_ROTATION_DEGREES = 15.0

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star")
PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 160, 70),
    "blue": (40, 90, 220), "purple": (130, 60, 190), "pink": (245, 135, 190), "brown": (125, 80, 40),
    "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128),
}
SIZES = {"small": (0.15, 0.25), "medium": (0.28, 0.38), "large": (0.42, 0.52)}
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS = tuple(" ".join(part for part in (row, column) if part not in ("middle", "center")) or "center"
                  for row in ROWS for column in COLUMNS)  # "top left", "top", ..., "center", ..., "bottom right"
TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "a {color} {shape}, {size}, {where}, on {background}",
    "{size} {color} {shape} {where}, {background} background",
)
# sides of the regular polygons, and the angle (degrees) that puts them in their usual pose
POLYGONS = {"triangle": (3, 0.0), "square": (4, 45.0), "diamond": (4, 0.0), "pentagon": (5, 0.0), "hexagon": (6, 30.0)}
STAR_INNER_RADIUS = 0.45


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One image: named attributes, and the exact geometry (fractions of the image side, degrees)."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    center_x: float
    center_y: float
    diameter: float
    rotation: float
    template: int

    @property
    def caption(self) -> str:
        caption = TEMPLATES[self.template].format(size=self.size, color=self.color, shape=self.shape,
                                                  where=_where(self.position), background=self.background)
        return re.sub(r"\ba (?=[aeiou])", "an ", caption)  # "an orange square"

    def attributes(self) -> dict[str, str]:
        """The named attributes (what a caption says): shape, color, size, position, background."""
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position,
                "background": self.background}


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def shape_spec(index: int) -> ShapeSpec:
    """The attributes of image `index` (>= 0) of the built-in stream."""
    if index < 0:
        raise ValueError(f"builtin:shapes image indices start at 0, got {index}")
    rng = random.Random(f"{BUILTIN_SHAPES_NAME}/{index}")
    shape, color = rng.choice(SHAPES), rng.choice(list(PALETTE))
    background = rng.choice([name for name in PALETTE if name != color])
    size = rng.choice(list(SIZES))
    diameter = rng.uniform(*SIZES[size])
    cell = rng.randrange(len(POSITIONS))
    radius = diameter / 2
    center_x, center_y = (_coordinate_in_third(rng, third, radius) for third in (cell % 3, cell // 3))
    return ShapeSpec(shape=shape, color=color, size=size, position=POSITIONS[cell], background=background,
                     center_x=center_x, center_y=center_y, diameter=diameter,
                     rotation=rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES),
                     template=rng.randrange(len(TEMPLATES)))


def _coordinate_in_third(rng: random.Random, third: int, radius: float) -> float:
    """A centre coordinate inside the given third of [0, 1] that keeps a circle of `radius` inside the image."""
    low, high = max(third / 3, radius), min((third + 1) / 3, 1 - radius)
    return rng.uniform(low, high)


def is_validation(spec: ShapeSpec) -> bool:
    """Whether the image with these attributes belongs to the validation split (a hash of all its fields)."""
    digest = hashlib.sha256(repr(dataclasses.astuple(spec)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < VALIDATION_FRACTION


def shape_specs(split: str = "train") -> Iterator[tuple[int, ShapeSpec]]:
    """(index, spec) of the images of one split, in index order, without end."""
    if split not in SPLITS:
        raise ValueError(f"{BUILTIN_SHAPES_NAME} has splits {', '.join(SPLITS)}, got {split!r}")
    want_validation = split == "validation"
    for index in itertools.count():
        spec = shape_spec(index)
        if is_validation(spec) == want_validation:
            yield index, spec


def draw_shape(spec: ShapeSpec, image_size: int) -> Image.Image:
    """The RGB image (image_size x image_size) that `spec` describes."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"{BUILTIN_SHAPES_NAME} draws images of at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    canvas_size = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), PALETTE[spec.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy, radius = spec.center_x * canvas_size, spec.center_y * canvas_size, spec.diameter * canvas_size / 2
    fill = PALETTE[spec.color]
    if spec.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_vertices(spec.shape, cx, cy, radius, spec.rotation), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _vertices(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon corners on the circle of `radius` around (cx, cy), the first one up before rotating (y grows down)."""
    if shape == "star":
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RADIUS for k in range(10)]
        offset = 0.0
    else:
        sides, offset = POLYGONS[shape]
        radii = [radius] * sides
    angles = [math.radians(offset + rotation) + 2 * math.pi * k / len(radii) for k in range(len(radii))]
    return [(cx + r * math.sin(a), cy - r * math.cos(a)) for r, a in zip(radii, angles)]

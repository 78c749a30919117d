"""The concept world: a procedurally generated, captioned image data set that runs offline on a CPU.

This module owns the world's configuration (`WorldConfig`), the pure renderer of one image (`render`),
sampling labelled, captioned images (`sample_world`), writing them as an ordinary Hugging Face
"imagefolder" (`generate_world_folder`) and the vocabulary its captions use (`world_vocabulary`).

Every image shows one shape (the object concept) filled with one style (a texture), in one colour, on
one background, at a mildly random position, scale and rotation. Shapes are large and textures
alternate between the colour and a shade of it, so a tiny diffusion model can learn every factor at
32x32 within minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffimmune.errors import DiffImmuneError

RGB = tuple[int, int, int]

# Part of every cache key: bump it whenever the pictures change for the same configuration, so that
# cached data sets and models trained on the old pictures are not silently reused.
RENDERER_VERSION = 1

# Drawing at 4x and averaging 4x4 blocks anti-aliases edges and textures at almost no cost.
SUPERSAMPLING = 4

CAPTION_FIELDS = ("shape", "style", "colour", "background")

_NAME_PATTERN = re.compile(r"^[a-z]+( [a-z]+)*$")
_PLACEHOLDER_PATTERN = re.compile(r"^\{(\w+)\}$")
_LITERAL_WORD_PATTERN = re.compile(r"^[a-z]+$")


# ----------------------------------------------------------------------------------------------------
# Shapes: outlines in unit coordinates (x right, y down), inside the unit circle so that a shape of
# scale s spans at most s of the image width whatever its rotation.
# ----------------------------------------------------------------------------------------------------


def _regular_polygon(vertices: int, radius: float, first_angle_degrees: float) -> np.ndarray:
    angles = np.deg2rad(first_angle_degrees + 360.0 * np.arange(vertices) / vertices)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_outline(points: int = 5, inner_radius: float = 0.5) -> np.ndarray:
    # A fat star (inner radius 0.5) leaves room for a texture inside its arms.
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart_outline(samples: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, samples, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    outline = np.stack([x, y], axis=1)
    outline -= (outline.max(axis=0) + outline.min(axis=0)) / 2.0
    return outline / np.linalg.norm(outline, axis=1).max()


def _within_unit_circle(outline: np.ndarray) -> np.ndarray:
    # The pose sampler keeps the unit circle inside the frame, so no outline may poke out of it.
    return outline / max(1.0, float(np.linalg.norm(outline, axis=1).max()))


_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]]),
    # Centred on its bounding box rather than its centroid, so that it fills the frame like the others.
    "triangle": np.array([[0.0, -0.95], [0.95, 0.7], [-0.95, 0.7]]) * 0.85,
    # Narrower than a square turned by 45 degrees, so that no allowed rotation makes one the other.
    "diamond": np.array([[0.0, -1.0], [0.68, 0.0], [0.0, 1.0], [-0.68, 0.0]]),
    "pentagon": _regular_polygon(5, 1.0, -90.0),
    # Available, but not a default: at 32x32 it is too close to a circle (IoU 0.9) to learn quickly.
    "hexagon": _regular_polygon(6, 1.0, -90.0),
    "star": _star_outline(),
    "cross": np.array(
        [
            [-0.32, -0.95],
            [0.32, -0.95],
            [0.32, -0.32],
            [0.95, -0.32],
            [0.95, 0.32],
            [0.32, 0.32],
            [0.32, 0.95],
            [-0.32, 0.95],
            [-0.32, 0.32],
            [-0.95, 0.32],
            [-0.95, -0.32],
            [-0.32, -0.32],
        ]
    ),
    # Thick strokes, so that a texture still shows inside the bolt.
    "lightning": np.array(
        [[-0.1, -1.0], [0.5, -1.0], [0.15, -0.25], [0.55, -0.25], [-0.3, 1.0], [-0.1, 0.1], [-0.55, 0.1]]
    )
    * 0.88,
    "heart": _heart_outline(),
    "arrow": np.array(
        [[-0.98, -0.26], [0.1, -0.26], [0.1, -0.66], [0.98, 0.0], [0.1, 0.66], [0.1, 0.26], [-0.98, 0.26]]
    ),
}

_POLYGONS = {name: _within_unit_circle(outline) for name, outline in _OUTLINES.items()}

# Shapes made of a disc minus a disc: (outer radius, hole radius, hole centre in unit coordinates).
_DISCS: dict[str, tuple[float, float, tuple[float, float]]] = {
    "circle": (0.95, 0.0, (0.0, 0.0)),
    "ring": (1.0, 0.52, (0.0, 0.0)),
    "moon": (1.0, 0.85, (0.48, -0.2)),
}

SHAPE_NAMES = tuple(_POLYGONS) + tuple(_DISCS)
STYLE_NAMES = ("solid", "stripes", "dots", "checker")

DEFAULT_SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "star",
    "cross",
    "ring",
    "lightning",
    "heart",
    "moon",
    "arrow",
)
DEFAULT_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 60, 200),
}
# Pure white and black: every colour above and its texture shade stand out from both.
DEFAULT_BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "black": (0, 0, 0)}
DEFAULT_CAPTION_TEMPLATES = (
    "a {colour} {shape} in {style} style",
    "a {style} {colour} {shape}",
    "a {colour} {shape} in {style} style on a {background} background",
    "a photo of a {style} {colour} {shape}",
    "a {colour} {shape}",
    "a {shape} in {style} style",
    "a photo of a {colour} {shape} on a {background} background",
)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


class PoseRange(BaseModel):
    """How much a shape may move, grow and turn; kept mild so that every shape stays recognisable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shift: float = Field(0.08, ge=0.0, le=0.25, description="largest offset, in image widths")
    scale_range: tuple[float, float] = Field(
        (0.65, 0.9), description="the shape's outer diameter, in image widths"
    )
    max_rotation_degrees: float = Field(20.0, ge=0.0, le=45.0)

    @model_validator(mode="after")
    def _check_scale_range(self) -> PoseRange:
        low, high = self.scale_range
        if not 0.1 <= low <= high <= 1.0:
            raise ValueError(f"scale_range must satisfy 0.1 <= low <= high <= 1.0, got {self.scale_range}")
        return self


@dataclass(frozen=True)
class Pose:
    """Where one shape is drawn: centre offset (image widths), outer diameter (image widths), turn."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 0.8
    rotation_degrees: float = 0.0


class WorldConfig(BaseModel):
    """Every factor of the concept world; its `key()` names cached data sets and models built from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resolution: int = Field(32, ge=8, le=512)
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    held_out_shapes: tuple[str, ...] = DEFAULT_SHAPES[-3:]
    styles: tuple[str, ...] = STYLE_NAMES
    colours: dict[str, RGB] = Field(default_factory=lambda: dict(DEFAULT_COLOURS))
    backgrounds: dict[str, RGB] = Field(default_factory=lambda: dict(DEFAULT_BACKGROUNDS))
    pose: PoseRange = PoseRange()
    caption_templates: tuple[str, ...] = DEFAULT_CAPTION_TEMPLATES
    seed: int = 0
    num_images: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _check_factors(self) -> WorldConfig:
        _require_known("shape", self.shapes, SHAPE_NAMES)
        _require_known("style", self.styles, STYLE_NAMES)
        _require_known("held-out shape", self.held_out_shapes, self.shapes)
        if not self.known_shapes:
            raise ValueError("held_out_shapes holds every shape: keep at least one shape known")
        for factor, names in (("colour", self.colours), ("background", self.backgrounds)):
            if not names:
                raise ValueError(f"{factor}s is empty: name at least one")
            for name, rgb in names.items():
                _require_name(factor, name)
                if not all(0 <= channel <= 255 for channel in rgb):
                    raise ValueError(f"{factor} {name!r} has RGB {rgb}: channels must lie in 0..255")
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.styles)) != len(self.styles):
            raise ValueError("shapes and styles must not repeat a name")
        if not self.caption_templates:
            raise ValueError("caption_templates is empty: give at least one, e.g. 'a {colour} {shape}'")
        for template in self.caption_templates:
            _check_template(template)
        return self

    @property
    def known_shapes(self) -> tuple[str, ...]:
        """The shapes a pre-trained model sees; the held-out ones are left for personalisation attacks."""
        return tuple(shape for shape in self.shapes if shape not in self.held_out_shapes)

    def key(self) -> str:
        """A short stable hash of the configuration (and renderer version), to name cached artifacts."""
        canonical = json.dumps(
            {"renderer_version": RENDERER_VERSION, "config": self.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _require_known(factor: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    if not names and factor != "held-out shape":
        raise ValueError(f"no {factor}s given: choose from {', '.join(allowed)}")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {factor} {', '.join(unknown)}: choose from {', '.join(allowed)}")


def _require_name(factor: str, name: str) -> None:
    # Names become caption words and label values: lowercase letters keep the tokenizer exact.
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"{factor} name {name!r} must be lowercase words of letters, e.g. 'light gray'")


def _check_template(template: str) -> None:
    placeholders = []
    for token in template.split():
        placeholder = _PLACEHOLDER_PATTERN.match(token)
        if placeholder:
            placeholders.append(placeholder.group(1))
        elif not _LITERAL_WORD_PATTERN.match(token):
            # Whole-word placeholders and plain words are what makes world_vocabulary exact.
            raise ValueError(
                f"caption template {template!r}: word {token!r} must be lowercase letters or one of "
                + ", ".join("{" + field + "}" for field in CAPTION_FIELDS)
            )
    unknown = [name for name in placeholders if name not in CAPTION_FIELDS]
    if unknown:
        raise ValueError(f"caption template {template!r} uses unknown field {unknown[0]!r}")
    if "shape" not in placeholders:
        raise ValueError(f"caption template {template!r} must name the {{shape}}")


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _rotation(degrees: float) -> np.ndarray:
    radians = math.radians(degrees)
    return np.array([[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]])


def _shape_mask(shape: str, pose: Pose, resolution: int) -> np.ndarray:
    """A boolean silhouette at the supersampled resolution."""
    size = resolution * SUPERSAMPLING
    centre = np.array([0.5 + pose.shift_x, 0.5 + pose.shift_y]) * size
    radius = pose.scale * size / 2.0
    rotation = _rotation(pose.rotation_degrees)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)

    def to_pixels(points: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(point) for point in points @ rotation.T * radius + centre]

    if shape in _POLYGONS:
        draw.polygon(to_pixels(_POLYGONS[shape]), fill=255)
    elif shape in _DISCS:
        outer, hole, hole_centre = _DISCS[shape]
        _draw_disc(draw, centre, outer * radius, 255)
        if hole > 0.0:
            (hole_pixel_centre,) = to_pixels(np.array([hole_centre]))
            _draw_disc(draw, np.array(hole_pixel_centre), hole * radius, 0)
    else:
        raise DiffImmuneError(f"unknown shape {shape!r}: choose from {', '.join(SHAPE_NAMES)}")
    return np.asarray(canvas) > 127


def _draw_disc(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, fill: int) -> None:
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)


@lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> np.ndarray:
    """Centres of the supersampled pixels, in output-pixel units (so texture periods read in pixels)."""
    size = resolution * SUPERSAMPLING
    return ((np.arange(size) + 0.5) / SUPERSAMPLING).astype(np.float32)


# Texture periods in output pixels: coarse enough to survive 32x32, distinct enough to tell apart.
STRIPE_PERIOD = 6.0
DOT_SPACING = 6.0
DOT_RADIUS = 1.6
CHECKER_CELL = 4.0


def _style_pattern(style: str, pose: Pose, resolution: int) -> np.ndarray | None:
    """Where the shade replaces the colour, in the shape's own frame so the texture turns with it."""
    if style == "solid":
        return None
    coordinates = _pixel_centres(resolution)
    centre_x = (0.5 + pose.shift_x) * resolution
    centre_y = (0.5 + pose.shift_y) * resolution
    x = coordinates[None, :] - np.float32(centre_x)
    y = coordinates[:, None] - np.float32(centre_y)
    radians = math.radians(-pose.rotation_degrees)
    cos, sin = np.float32(math.cos(radians)), np.float32(math.sin(radians))
    u = x * cos - y * sin
    v = x * sin + y * cos
    if style == "stripes":
        return np.floor(v / (STRIPE_PERIOD / 2.0)) % 2 == 1
    if style == "dots":
        du = (u + DOT_SPACING / 2.0) % DOT_SPACING - DOT_SPACING / 2.0
        dv = (v + DOT_SPACING / 2.0) % DOT_SPACING - DOT_SPACING / 2.0
        return du * du + dv * dv < DOT_RADIUS * DOT_RADIUS
    if style == "checker":
        return (np.floor(u / CHECKER_CELL) + np.floor(v / CHECKER_CELL)) % 2 == 1
    raise DiffImmuneError(f"unknown style {style!r}: choose from {', '.join(STYLE_NAMES)}")


# Least luminance step between a texture's two tones for the pattern to read at 32x32.
MIN_TEXTURE_CONTRAST = 40.0


def texture_shade(colour: RGB, background: RGB) -> np.ndarray:
    """The second tone of a texture: a darker or a lighter shade of the colour.

    A shade of the colour itself (never the background colour) keeps the silhouette whole. It goes
    away from the background (darker on white, lighter on black) so the shape's edge stays sharp,
    unless that step is too faint to see, as lighter yellow on yellow is.
    """
    colour_array = np.asarray(colour, dtype=np.float32)
    darker = colour_array * np.float32(0.5)
    lighter = colour_array + (np.float32(255.0) - colour_array) * np.float32(0.5)
    preferred, other = (darker, lighter) if _luminance(background) > 127.5 else (lighter, darker)
    if abs(_luminance(preferred) - _luminance(colour_array)) >= MIN_TEXTURE_CONTRAST:
        return preferred
    return other


def _luminance(rgb) -> float:
    red, green, blue = (float(channel) for channel in rgb)
    return 0.299 * red + 0.587 * green + 0.114 * blue


def render(
    shape: str,
    style: str,
    colour: RGB,
    background: RGB,
    pose: Pose = Pose(),
    resolution: int = 32,
) -> np.ndarray:
    """One image, (resolution, resolution, 3) uint8: a pure function of its arguments."""
    mask = _shape_mask(shape, pose, resolution)
    pattern = _style_pattern(style, pose, resolution)
    # Mixing three tones by their coverage of each output pixel is the same as averaging the
    # supersampled RGB image, at a fraction of the cost.
    shape_coverage = _block_mean(mask, resolution)
    shade_coverage = (
        np.zeros_like(shape_coverage) if pattern is None else _block_mean(mask & pattern, resolution)
    )
    colour_coverage = shape_coverage - shade_coverage
    background_coverage = 1.0 - shape_coverage
    image = (
        background_coverage[..., None] * np.asarray(background, dtype=np.float32)
        + colour_coverage[..., None] * np.asarray(colour, dtype=np.float32)
        + shade_coverage[..., None] * texture_shade(colour, background)
    )
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _block_mean(supersampled: np.ndarray, resolution: int) -> np.ndarray:
    """Average SUPERSAMPLING x SUPERSAMPLING blocks of a boolean map: the fraction each pixel covers."""
    rows = supersampled.reshape(resolution, SUPERSAMPLING, -1).sum(axis=1, dtype=np.float32)
    blocks = rows.reshape(resolution, resolution, SUPERSAMPLING).sum(axis=2)
    return blocks / float(SUPERSAMPLING * SUPERSAMPLING)


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldRecord:
    """One generated image with its caption and the factor values that produced it."""

    image: np.ndarray
    caption: str
    labels: dict[str, str]


def sample_pose(pose_range: PoseRange, rng: np.random.Generator, resolution: int) -> Pose:
    scale = float(rng.uniform(*pose_range.scale_range))
    # Keep a one-pixel margin inside the frame: larger shapes get less room to move, none is cut off.
    max_shift = max(0.0, min(pose_range.max_shift, (1.0 - scale) / 2.0 - 1.0 / resolution))
    shift_x, shift_y = (float(value) for value in rng.uniform(-max_shift, max_shift, size=2))
    rotation = float(rng.uniform(-pose_range.max_rotation_degrees, pose_range.max_rotation_degrees))
    return Pose(shift_x=shift_x, shift_y=shift_y, scale=scale, rotation_degrees=rotation)


def caption_from_template(template: str, labels: dict[str, str]) -> str:
    """Fill a template and write "an" before a vowel ("an arrow"), so captions read as English."""
    words = template.format(**labels).split()
    fixed = [
        "an" if word == "a" and index + 1 < len(words) and words[index + 1][0] in "aeiou" else word
        for index, word in enumerate(words)
    ]
    return " ".join(fixed)


def _choose_factor(factor: str, requested: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
    if requested is None:
        return tuple(available)
    chosen = tuple(requested)
    if not chosen:
        raise DiffImmuneError(f"no {factor}s requested: pass None for all, or some of {', '.join(available)}")
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise DiffImmuneError(
            f"{factor} {', '.join(unknown)} is not in this world: choose from {', '.join(available)}"
        )
    return chosen


def sample_world(
    config: WorldConfig,
    n: int,
    rng: np.random.Generator,
    shapes: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    backgrounds: Sequence[str] | None = None,
) -> list[WorldRecord]:
    """`n` images with every factor drawn uniformly and independently; None means the whole world.

    Restricting a factor draws only some concepts, e.g. `shapes=config.known_shapes` for pre-training
    or `shapes=config.held_out_shapes` for a personalisation target.
    """
    factor_choices = {
        "shape": _choose_factor("shape", shapes, config.shapes),
        "style": _choose_factor("style", styles, config.styles),
        "colour": _choose_factor("colour", colours, list(config.colours)),
        "background": _choose_factor("background", backgrounds, list(config.backgrounds)),
    }
    records = []
    for _ in range(n):
        labels = {factor: str(rng.choice(choices)) for factor, choices in factor_choices.items()}
        pose = sample_pose(config.pose, rng, config.resolution)
        template = config.caption_templates[int(rng.integers(len(config.caption_templates)))]
        image = render(
            labels["shape"],
            labels["style"],
            config.colours[labels["colour"]],
            config.backgrounds[labels["background"]],
            pose,
            config.resolution,
        )
        records.append(
            WorldRecord(image=image, caption=caption_from_template(template, labels), labels=labels)
        )
    return records


def world_vocabulary(config: WorldConfig) -> list[str]:
    """Every word a caption of this world can contain, sorted: the word-level tokenizer's vocabulary."""
    values_by_field = {
        "shape": config.shapes,
        "style": config.styles,
        "colour": tuple(config.colours),
        "background": tuple(config.backgrounds),
    }
    words: set[str] = set()
    for template in config.caption_templates:
        for token in template.split():
            placeholder = _PLACEHOLDER_PATTERN.match(token)
            if placeholder is None:
                words.add(token)
                continue
            for value in values_by_field[placeholder.group(1)]:
                words.update(value.split())
    if "a" in words and any(word[0] in "aeiou" for word in words if word != "a"):
        words.add("an")
    return sorted(words)


# ----------------------------------------------------------------------------------------------------
# Writing a Hugging Face imagefolder
# ----------------------------------------------------------------------------------------------------

WORLD_JSON = "world.json"
METADATA_JSONL = "metadata.jsonl"


def generate_world_folder(
    config: WorldConfig,
    out_dir: str | os.PathLike[str],
    n: int | None = None,
    shapes: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    backgrounds: Sequence[str] | None = None,
    seed: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `n` (default `config.num_images`) world images as an imagefolder and return its path.

    The folder holds `000000.png`, ..., `metadata.jsonl` (file_name, text, shape, style, colour,
    background, held_out) and `world.json` (the config and what was sampled). It appears complete or
    not at all. A folder already holding the same `world.json` is returned as it is: the same
    arguments always give byte-identical files, so there is nothing to redo.
    """
    out_path = Path(out_dir)
    seed = config.seed if seed is None else seed
    n = config.num_images if n is None else n
    if n < 1:
        raise DiffImmuneError(f"n={n}: ask for at least one image")
    factors = {
        "shapes": _choose_factor("shape", shapes, config.shapes),
        "styles": _choose_factor("style", styles, config.styles),
        "colours": _choose_factor("colour", colours, list(config.colours)),
        "backgrounds": _choose_factor("background", backgrounds, list(config.backgrounds)),
    }
    world_json = _world_json_text(config, n, seed, factors)
    if out_path.exists():
        if _holds_world_json(out_path, world_json):
            return out_path
        if not overwrite:
            raise DiffImmuneError(
                f"{out_path} already exists and holds something else: pass overwrite=True or choose a new folder"
            )

    records = sample_world(config, n, np.random.default_rng(seed), **factors)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_imagefolder(staging, records, config, world_json)
        _replace_folder(staging, out_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_path


def _world_json_text(config: WorldConfig, n: int, seed: int, factors: dict[str, Sequence[str]]) -> str:
    document = {
        "world_key": config.key(),
        "config": config.model_dump(mode="json"),
        "sample": {"n": n, "seed": seed, **{name: list(values) for name, values in factors.items()}},
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def read_world_config(folder: str | os.PathLike[str]) -> WorldConfig:
    """The configuration a world folder was generated from."""
    path = Path(folder) / WORLD_JSON
    if not path.is_file():
        raise DiffImmuneError(f"{path} does not exist: generate the folder with generate_world_folder")
    try:
        return WorldConfig.model_validate(json.loads(path.read_text())["config"])
    except (ValueError, KeyError) as error:
        first_line = str(error).splitlines()[0]
        raise DiffImmuneError(
            f"{path} is not a valid world.json ({first_line}): regenerate the folder"
        ) from None


def _holds_world_json(folder: Path, world_json: str) -> bool:
    path = folder / WORLD_JSON
    return path.is_file() and path.read_text() == world_json and (folder / METADATA_JSONL).is_file()


def _write_imagefolder(
    folder: Path, records: list[WorldRecord], config: WorldConfig, world_json: str
) -> None:
    rows = []
    digits = max(6, len(str(len(records) - 1)))
    for index, record in enumerate(records):
        file_name = f"{index:0{digits}d}.png"
        Image.fromarray(record.image, mode="RGB").save(folder / file_name, format="PNG")
        row = {"file_name": file_name, "text": record.caption, **record.labels}
        row["held_out"] = record.labels["shape"] in config.held_out_shapes
        rows.append(json.dumps(row))
    (folder / METADATA_JSONL).write_text("\n".join(rows) + "\n")
    # Written last: its presence marks a complete folder for _holds_world_json.
    (folder / WORLD_JSON).write_text(world_json)


def _replace_folder(staging: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.replace(staging, target)
            return
        except OSError:
            # Another process finished the same folder first: that is fine if it wrote the same thing.
            if _holds_world_json(target, (staging / WORLD_JSON).read_text()):
                return
            raise
    # Overwriting: move the old folder aside first so the target is never half old, half new.
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired)

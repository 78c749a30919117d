"""The concept world: deterministic, labelled truthfully, readable at 32x32, written as an imagefolder."""

import itertools
import json

import numpy as np
import pytest
from pydantic import ValidationError

from diffimmune.data.world import (
    Pose,
    WorldConfig,
    generate_world_folder,
    read_world_config,
    render,
    sample_world,
    texture_shade,
    world_vocabulary,
)
from diffimmune.errors import DiffImmuneError

CONFIG = WorldConfig()
SQUARE_POSE = Pose(scale=0.9, rotation_degrees=0.0)


def colour_vote(image: np.ndarray, background, colours: dict) -> str:
    """The colour most shape pixels are nearest to, counting each colour's texture shade as that colour."""
    background = np.asarray(background)
    candidates = [(name, np.asarray(rgb, dtype=float)) for name, rgb in colours.items()]
    candidates += [(name, texture_shade(rgb, tuple(background))) for name, rgb in colours.items()]
    pixels = image[foreground_mask(image, background)].astype(float)
    distances = np.stack([np.linalg.norm(pixels - rgb, axis=-1) for _, rgb in candidates])
    names = [candidates[index][0] for index in distances.argmin(axis=0)]
    return max(set(names), key=names.count)


def foreground_mask(image: np.ndarray, background) -> np.ndarray:
    return np.abs(image.astype(int) - np.asarray(background)).sum(axis=-1) > 60


def interior_mask(shape: str, pose: Pose, colour, background) -> np.ndarray:
    """Pixels fully inside the shape: where a solid render shows exactly the colour."""
    solid = render(shape, "solid", colour, background, pose, CONFIG.resolution)
    return np.all(solid == np.asarray(colour, dtype=np.uint8), axis=-1)


# ---------------------------------------------------------------------------------------- config


def test_default_world_has_enough_factors():
    assert len(CONFIG.shapes) >= 10
    assert len(CONFIG.held_out_shapes) == 3
    assert len(CONFIG.styles) >= 4 and len(CONFIG.colours) >= 4 and len(CONFIG.backgrounds) >= 2


def test_known_shapes_are_shapes_minus_held_out():
    assert set(CONFIG.known_shapes) == set(CONFIG.shapes) - set(CONFIG.held_out_shapes)
    assert not set(CONFIG.known_shapes) & set(CONFIG.held_out_shapes)


def test_held_out_shape_must_be_a_shape_of_the_world():
    with pytest.raises(ValidationError, match="held-out shape"):
        WorldConfig(shapes=("circle", "square", "star"), held_out_shapes=("heart",))


def test_caption_template_must_name_the_shape():
    with pytest.raises(ValidationError, match="shape"):
        WorldConfig(caption_templates=("a {colour} thing",))


def test_key_is_stable_and_follows_the_config():
    assert WorldConfig().key() == CONFIG.key()
    assert len(CONFIG.key()) == 16
    assert WorldConfig(seed=1).key() != CONFIG.key()
    assert WorldConfig(colours={"red": (255, 0, 0)}).key() != CONFIG.key()


# ---------------------------------------------------------------------------------------- sampling


def test_same_seed_gives_identical_images_and_captions():
    first = sample_world(CONFIG, 16, np.random.default_rng(7))
    second = sample_world(CONFIG, 16, np.random.default_rng(7))
    assert [record.caption for record in first] == [record.caption for record in second]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second, strict=True))


def test_different_seed_gives_different_images():
    first = sample_world(CONFIG, 16, np.random.default_rng(7))
    second = sample_world(CONFIG, 16, np.random.default_rng(8))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, second, strict=True))


def test_images_are_rgb_uint8_at_the_configured_resolution():
    (record,) = sample_world(WorldConfig(resolution=24), 1, np.random.default_rng(0))
    assert record.image.shape == (24, 24, 3) and record.image.dtype == np.uint8


def test_every_caption_names_its_shape_and_most_name_style_and_colour():
    records = sample_world(CONFIG, 300, np.random.default_rng(1))
    assert all(record.labels["shape"] in record.caption.split() for record in records)
    names_style_and_colour = [
        record.labels["style"] in record.caption.split() and record.labels["colour"] in record.caption.split()
        for record in records
    ]
    assert np.mean(names_style_and_colour) > 0.5


def test_caption_says_an_before_a_vowel():
    config = WorldConfig(caption_templates=("a {shape} in {style} style", "a {colour} {shape}"))
    captions = {
        record.caption
        for record in sample_world(
            config, 20, np.random.default_rng(0), shapes=["arrow"], colours=["red"], styles=["solid"]
        )
    }
    assert captions == {"an arrow in solid style", "a red arrow"}
    assert "an" in world_vocabulary(config)


def test_vocabulary_covers_every_caption():
    vocabulary = set(world_vocabulary(CONFIG))
    records = sample_world(CONFIG, 400, np.random.default_rng(2))
    assert {word for record in records for word in record.caption.split()} <= vocabulary
    assert world_vocabulary(CONFIG) == sorted(vocabulary)


def test_only_known_shapes_never_draws_a_held_out_one():
    records = sample_world(CONFIG, 200, np.random.default_rng(3), shapes=CONFIG.known_shapes)
    drawn = {record.labels["shape"] for record in records}
    assert drawn <= set(CONFIG.known_shapes)
    assert len(drawn) == len(CONFIG.known_shapes)  # and every known one does appear


def test_restricting_to_a_shape_outside_the_world_is_an_error():
    with pytest.raises(DiffImmuneError, match="dragon"):
        sample_world(CONFIG, 1, np.random.default_rng(0), shapes=["dragon"])


# ---------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("background", list(CONFIG.backgrounds))
@pytest.mark.parametrize("style", list(CONFIG.styles))
def test_shape_pixels_carry_the_label_colour(style, background):
    for colour_name, colour in CONFIG.colours.items():
        background_rgb = CONFIG.backgrounds[background]
        image = render("square", style, colour, background_rgb, SQUARE_POSE)
        assert colour_vote(image, background_rgb, CONFIG.colours) == colour_name


@pytest.mark.parametrize("background", list(CONFIG.backgrounds))
def test_textured_silhouette_stays_clear_of_the_background(background):
    background_rgb = np.asarray(CONFIG.backgrounds[background])
    for style, colour in itertools.product(CONFIG.styles, CONFIG.colours.values()):
        inside = interior_mask("star", SQUARE_POSE, colour, background_rgb)
        image = render("star", style, colour, background_rgb, SQUARE_POSE)
        distance_to_background = np.linalg.norm(image[inside].astype(float) - background_rgb, axis=-1)
        assert distance_to_background.min() > 80, (style, colour)


def test_texture_tones_differ_clearly_in_brightness():
    def luminance(rgb):
        return float(np.dot(np.asarray(rgb, dtype=float), [0.299, 0.587, 0.114]))

    for colour, background in itertools.product(CONFIG.colours.values(), CONFIG.backgrounds.values()):
        assert abs(luminance(texture_shade(colour, background)) - luminance(colour)) >= 40, (
            colour,
            background,
        )


def test_every_shape_has_its_own_silhouette():
    silhouettes = {
        shape: foreground_mask(render(shape, "solid", (0, 0, 0), (255, 255, 255), SQUARE_POSE), (255,) * 3)
        for shape in CONFIG.shapes
    }
    for first, second in itertools.combinations(CONFIG.shapes, 2):
        overlap = (silhouettes[first] & silhouettes[second]).sum() / (
            silhouettes[first] | silhouettes[second]
        ).sum()
        assert overlap < 0.88, (first, second, overlap)


def test_shapes_span_at_least_half_the_image_at_the_smallest_scale():
    smallest = Pose(scale=CONFIG.pose.scale_range[0])
    for shape in CONFIG.shapes:
        rows, columns = np.nonzero(
            foreground_mask(render(shape, "solid", (0, 0, 0), (255,) * 3, smallest), (255,) * 3)
        )
        extent = max(np.ptp(rows), np.ptp(columns)) + 1
        assert extent >= CONFIG.resolution / 2, shape


def test_shapes_never_touch_the_frame():
    for record in sample_world(CONFIG, 300, np.random.default_rng(4)):
        image, background = record.image, CONFIG.backgrounds[record.labels["background"]]
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.all(border == np.asarray(background)), record.labels


def test_stripes_have_a_periodic_profile_that_solid_has_not():
    colour, background = CONFIG.colours["blue"], CONFIG.backgrounds["white"]
    centre_column = slice(14, 18)
    profiles = {
        style: render("square", style, colour, background, SQUARE_POSE)[8:24, centre_column].mean(axis=(1, 2))
        for style in ("solid", "stripes")
    }
    assert np.ptp(profiles["solid"]) < 1.0
    spectrum = np.abs(np.fft.rfft(profiles["stripes"] - profiles["stripes"].mean()))
    frequencies = np.fft.rfftfreq(len(profiles["stripes"]))
    assert np.ptp(profiles["stripes"]) > 40
    assert 1 / 7 <= frequencies[spectrum.argmax()] <= 1 / 5  # a period of about six pixels


def test_each_style_has_its_own_texture_signature():
    colour, background = CONFIG.colours["red"], CONFIG.backgrounds["white"]
    inside = interior_mask("square", SQUARE_POSE, colour, background)
    rows = np.nonzero(inside.any(axis=1))[0]
    columns = np.nonzero(inside.any(axis=0))[0]
    window = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))

    def shade_map(style):
        image = render("square", style, colour, background, SQUARE_POSE)[window].astype(float)
        return np.abs(image - np.asarray(colour)).sum(axis=-1) > 60  # where the shade shows

    stripes, dots, checker = shade_map("stripes"), shade_map("dots"), shade_map("checker")
    assert not shade_map("solid").any()
    assert 0.3 < stripes.mean() < 0.7 and 0.3 < checker.mean() < 0.7
    assert 0.05 < dots.mean() < 0.3  # dots are sparse
    # Unrotated stripes are constant along each row; a checkerboard is not.
    assert all(len(set(row)) == 1 for row in stripes)
    assert sum(len(set(row)) > 1 for row in checker) > len(checker) // 2


# ---------------------------------------------------------------------------------------- folder


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_same_config_writes_byte_identical_folders(tmp_path):
    config = WorldConfig(num_images=12)
    first = generate_world_folder(config, tmp_path / "first")
    second = generate_world_folder(config, tmp_path / "second")
    assert folder_bytes(first) == folder_bytes(second)
    other = generate_world_folder(WorldConfig(num_images=12, seed=1), tmp_path / "other")
    assert folder_bytes(other)["000000.png"] != folder_bytes(first)["000000.png"]


def test_folder_has_imagefolder_metadata_matching_the_pictures(tmp_path):
    from PIL import Image

    config = WorldConfig(num_images=30, seed=5)
    folder = generate_world_folder(config, tmp_path / "world")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    for row in rows:
        assert set(row) == {"file_name", "text", "shape", "style", "colour", "background", "held_out"}
        assert row["held_out"] == (row["shape"] in config.held_out_shapes)
        assert row["shape"] in row["text"].split()
        image = np.asarray(Image.open(folder / row["file_name"]))
        background = np.asarray(config.backgrounds[row["background"]])
        assert np.all(image[0, 0] == background)  # the corner is background
        assert colour_vote(image, background, config.colours) == row["colour"]
    assert read_world_config(folder) == config


def test_folder_is_written_without_leftover_temporary_folders(tmp_path):
    generate_world_folder(WorldConfig(num_images=4), tmp_path / "world")
    assert [path.name for path in tmp_path.iterdir()] == ["world"]


def test_existing_identical_folder_is_reused_and_a_different_one_is_refused(tmp_path):
    config = WorldConfig(num_images=4)
    folder = generate_world_folder(config, tmp_path / "world")
    marker = folder / "000000.png"
    modified_before = marker.stat().st_mtime_ns
    generate_world_folder(config, folder)
    assert marker.stat().st_mtime_ns == modified_before
    with pytest.raises(DiffImmuneError, match="already exists"):
        generate_world_folder(WorldConfig(num_images=5), folder)
    generate_world_folder(WorldConfig(num_images=5), folder, overwrite=True)
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 5


def test_folder_of_held_out_shapes_only(tmp_path):
    folder = generate_world_folder(CONFIG, tmp_path / "held_out", n=20, shapes=CONFIG.held_out_shapes)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert all(row["held_out"] and row["shape"] in CONFIG.held_out_shapes for row in rows)

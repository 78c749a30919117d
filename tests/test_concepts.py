"""Concept sets: any captioned image folder, read, sliced by concept, with errors that name the culprit."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffimmune.data.concepts import ConceptSet
from diffimmune.data.world import WorldConfig, generate_world_folder
from diffimmune.errors import DiffImmuneError


def write_image(path, colour=(255, 0, 0), size=(8, 8), mode="RGB"):
    Image.new("RGB", size, colour).convert(mode).save(path)


def write_jsonl_folder(folder, rows, make_images=True):
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if make_images and "file_name" in row:
            write_image(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


ANIMALS = [
    {"file_name": "a.png", "text": "a red cat", "animal": "cat", "colour": "red"},
    {"file_name": "b.png", "text": "a blue cat", "animal": "cat", "colour": "blue"},
    {"file_name": "c.png", "text": "a red dog", "animal": "dog", "colour": "red"},
]


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str):
    message = str(error.value)
    assert "\n" not in message
    assert name in message


# ---------------------------------------------------------------------------------------- reading


def test_world_folder_reloads_with_its_labels_and_pixels(tmp_path):
    config = WorldConfig(num_images=20, seed=3)
    folder = generate_world_folder(config, tmp_path / "world")
    concept_set = ConceptSet.from_folder(folder)
    assert len(concept_set) == 20
    assert concept_set.label_columns == ("shape", "style", "colour", "background", "held_out")
    assert set(concept_set.concepts("shape")) <= set(config.shapes)
    images = concept_set.images()
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    first = np.array(Image.open(concept_set.records[0].path))
    assert torch.equal((images[0] * 255).round().to(torch.uint8), torch.from_numpy(first).permute(2, 0, 1))


def test_records_hold_path_text_and_labels(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    record = concept_set.records[0]
    assert record.path == tmp_path / "a.png"
    assert record.text == "a red cat"
    assert dict(record.labels) == {"animal": "cat", "colour": "red"}


def test_csv_metadata_is_read_like_jsonl(tmp_path):
    for row in ANIMALS:
        write_image(tmp_path / row["file_name"])
    with (tmp_path / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ANIMALS[0]))
        writer.writeheader()
        writer.writerows(ANIMALS)
    concept_set = ConceptSet.from_folder(tmp_path)
    assert concept_set.prompts("animal=cat") == ["a red cat", "a blue cat"]


def test_concepts_lists_sorted_distinct_values(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    assert concept_set.concepts("colour") == ["blue", "red"]


# ---------------------------------------------------------------------------------------- selecting


def test_select_by_column_and_value(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    assert concept_set.select("colour=red").prompts() == ["a red cat", "a red dog"]


def test_select_by_bare_value_found_in_one_column(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    assert concept_set.prompts("dog") == ["a red dog"]
    assert len(concept_set.select("cat")) == 2


def test_bare_value_in_two_columns_is_ambiguous(tmp_path):
    rows = [
        {"file_name": "a.png", "text": "orange on orange", "fruit": "orange", "colour": "orange"},
        {"file_name": "b.png", "text": "a lime", "fruit": "lime", "colour": "green"},
    ]
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, rows))
    with pytest.raises(DiffImmuneError, match="ambiguous") as error:
        concept_set.select("orange")
    assert_one_line_naming(error, "fruit=orange")
    assert len(concept_set.select("fruit=orange")) == 1


def test_boolean_labels_match_as_true_and_false(tmp_path):
    folder = generate_world_folder(WorldConfig(), tmp_path / "world", n=40)
    concept_set = ConceptSet.from_folder(folder)
    held_out = concept_set.select("held_out=true")
    assert {record.labels["shape"] for record in held_out.records} <= set(WorldConfig().held_out_shapes)
    assert len(held_out) + len(concept_set.select("held_out=False")) == 40


def test_caption_words_are_matched_when_the_folder_has_no_labels(tmp_path):
    rows = [
        {"file_name": "a.png", "text": "A red star."},
        {"file_name": "b.png", "text": "a red starfish"},
        {"file_name": "c.png", "text": "a big red star in the sky"},
    ]
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, rows))
    assert concept_set.label_columns == ()
    assert concept_set.prompts("star") == ["A red star.", "a big red star in the sky"]
    assert len(concept_set.select("red star")) == 2


# ---------------------------------------------------------------------------------------- images


def test_images_are_converted_to_rgb(tmp_path):
    folder = write_jsonl_folder(
        tmp_path, [{"file_name": "gray.png", "text": "a gray square"}], make_images=False
    )
    write_image(folder / "gray.png", colour=(128, 128, 128), mode="L")
    rgba = {"file_name": "rgba.png", "text": "a red square"}
    write_image(folder / "rgba.png", colour=(255, 0, 0), mode="RGBA")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "gray.png", "text": "a gray square"}) + "\n" + json.dumps(rgba) + "\n"
    )
    images = ConceptSet.from_folder(folder).images()
    assert images.shape == (2, 3, 8, 8)
    assert torch.allclose(images[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_images_of_different_sizes_need_a_size(tmp_path):
    folder = write_jsonl_folder(tmp_path, ANIMALS[:2])
    write_image(folder / "b.png", size=(16, 12))
    concept_set = ConceptSet.from_folder(folder)
    with pytest.raises(DiffImmuneError, match="size"):
        concept_set.images()
    assert concept_set.images(size=6).shape == (2, 3, 6, 6)


def test_size_resizes_and_centre_crops_wide_images(tmp_path):
    folder = write_jsonl_folder(
        tmp_path, [{"file_name": "wide.png", "text": "a wide thing"}], make_images=False
    )
    wide = np.zeros((8, 24, 3), dtype=np.uint8)
    wide[:, 8:16] = 255  # only the middle third is white
    Image.fromarray(wide).save(folder / "wide.png")
    (image,) = ConceptSet.from_folder(folder).images(size=8)
    assert image.shape == (3, 8, 8)
    assert image[:, :, 2:6].min() > 0.9  # the crop kept the centre


# ---------------------------------------------------------------------------------------- errors


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DiffImmuneError, match="does not exist") as error:
        ConceptSet.from_folder(tmp_path / "nowhere")
    assert_one_line_naming(error, "nowhere")


def test_folder_without_metadata_says_what_to_add(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(DiffImmuneError, match="no metadata.jsonl or metadata.csv") as error:
        ConceptSet.from_folder(tmp_path)
    assert_one_line_naming(error, "file_name,text")


def test_row_without_text_names_the_line(tmp_path):
    rows = [ANIMALS[0], {"file_name": "b.png", "animal": "cat"}]
    with pytest.raises(DiffImmuneError, match="line 2") as error:
        ConceptSet.from_folder(write_jsonl_folder(tmp_path, rows))
    assert_one_line_naming(error, "'text'")


def test_row_without_file_name_names_the_line(tmp_path):
    rows = [{"text": "a cat"}]
    with pytest.raises(DiffImmuneError, match="line 1") as error:
        ConceptSet.from_folder(write_jsonl_folder(tmp_path, rows))
    assert_one_line_naming(error, "'file_name'")


def test_row_naming_a_missing_file_names_it(tmp_path):
    folder = write_jsonl_folder(tmp_path, ANIMALS)
    (folder / "c.png").unlink()
    with pytest.raises(DiffImmuneError, match="does not exist") as error:
        ConceptSet.from_folder(folder)
    assert_one_line_naming(error, "c.png")


def test_corrupt_image_is_named(tmp_path):
    folder = write_jsonl_folder(tmp_path, ANIMALS)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    concept_set = ConceptSet.from_folder(folder)
    with pytest.raises(DiffImmuneError, match="cannot read image") as error:
        concept_set.images()
    assert_one_line_naming(error, "b.png")
    assert concept_set.images("dog").shape == (1, 3, 8, 8)  # the other images still load


def test_invalid_json_line_is_named(tmp_path):
    folder = write_jsonl_folder(tmp_path, ANIMALS)
    with (folder / "metadata.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DiffImmuneError, match="line 4") as error:
        ConceptSet.from_folder(folder)
    assert_one_line_naming(error, "metadata.jsonl")


def test_unknown_concept_lists_the_available_values(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    with pytest.raises(DiffImmuneError, match="not found") as error:
        concept_set.select("horse")
    assert_one_line_naming(error, "cat, dog")
    with pytest.raises(DiffImmuneError, match="animal takes cat, dog"):
        concept_set.select("animal=horse")


def test_unknown_label_column_lists_the_columns(tmp_path):
    concept_set = ConceptSet.from_folder(write_jsonl_folder(tmp_path, ANIMALS))
    with pytest.raises(DiffImmuneError, match="animal, colour"):
        concept_set.concepts("breed")

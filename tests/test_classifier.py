"""The world classifier: learns the world's labels, names classes by column, saves and loads exactly,
refuses broken files with a clear error and trains deterministically."""

import numpy as np
import pytest
import torch

from diffimmune.data.world import WorldConfig, sample_world
from diffimmune.errors import DiffImmuneError
from diffimmune.eval.classifier import (
    CLASSIFIER_JSON,
    CLASSIFIER_WEIGHTS,
    WorldClassifier,
    degrade,
    images_to_tensor,
    measure_accuracy,
    train_world_classifier,
    world_heads,
)

TINY_WORLD = WorldConfig(
    shapes=("circle", "square", "triangle", "star"),
    held_out_shapes=("star",),
    colours={"red": (220, 40, 40), "blue": (40, 80, 225)},
)
TINY_WIDTHS = (16, 32, 64, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(one_thread):
    return train_world_classifier(
        TINY_WORLD,
        steps=200,
        batch_size=64,
        widths=TINY_WIDTHS,
        progress=False,
        validation_size=400,
        num_threads=1,
    )


@pytest.fixture(scope="module")
def held_out_records():
    return sample_world(TINY_WORLD, 300, np.random.default_rng(12345))


def test_trained_classifier_beats_chance_by_far_on_fresh_images(trained, held_out_records):
    classifier, metrics = trained
    accuracy = measure_accuracy(classifier, held_out_records)
    assert accuracy["shape_accuracy"] > 0.8  # chance is 0.25
    assert accuracy["colour_accuracy"] > 0.95 and accuracy["background_accuracy"] > 0.95
    assert metrics["shape_accuracy"] > 0.8
    assert set(metrics) >= {"shape_accuracy", "style_accuracy", "colour_accuracy", "background_accuracy"}


def test_held_out_shapes_are_detected_too(trained):
    classifier, _ = trained
    assert classifier.heads["shape"] == list(TINY_WORLD.shapes)
    stars = sample_world(TINY_WORLD, 60, np.random.default_rng(7), shapes=["star"])
    predictions = classifier.predict([record.image for record in stars])["shape"]
    assert predictions.count("star") / len(predictions) > 0.7


def test_predict_names_classes_of_each_column(trained, held_out_records):
    classifier, _ = trained
    predictions = classifier.predict(images_to_tensor(held_out_records[:20]), batch_size=8)
    assert set(predictions) == set(world_heads(TINY_WORLD))
    for column, names in predictions.items():
        assert len(names) == 20
        assert set(names) <= set(world_heads(TINY_WORLD)[column])


def test_features_and_probabilities_have_the_documented_shapes(trained, held_out_records):
    classifier, _ = trained
    images = images_to_tensor(held_out_records[:5])
    assert classifier.features(images).shape == (5, TINY_WIDTHS[-1])
    probabilities = classifier.probabilities(images)
    for column, names in world_heads(TINY_WORLD).items():
        assert probabilities[column].shape == (5, len(names))
        torch.testing.assert_close(probabilities[column].sum(dim=-1), torch.ones(5))


def test_larger_images_are_resized_to_the_classifier_resolution(trained, held_out_records):
    classifier, _ = trained
    images = images_to_tensor(held_out_records[:4])
    larger = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert classifier.predict(larger) == classifier.predict(images)


def test_save_and_load_give_identical_logits(trained, held_out_records, tmp_path):
    classifier, metrics = trained
    classifier.save(tmp_path / "classifier")
    loaded = WorldClassifier.load(tmp_path / "classifier")
    images = images_to_tensor(held_out_records[:16])
    with torch.no_grad():
        expected, actual = classifier.logits(images), loaded.logits(images)
    for column in classifier.heads:
        assert torch.equal(expected[column], actual[column])
    assert loaded.config == classifier.config
    assert loaded.world_key == TINY_WORLD.key()
    assert loaded.accuracies["shape_accuracy"] == metrics["shape_accuracy"]


def test_loading_a_missing_weights_file_names_it(trained, tmp_path):
    classifier, _ = trained
    folder = classifier.save(tmp_path / "classifier")
    (folder / CLASSIFIER_WEIGHTS).unlink()
    with pytest.raises(DiffImmuneError, match=CLASSIFIER_WEIGHTS):
        WorldClassifier.load(folder)


def test_loading_a_missing_folder_names_the_config_file(tmp_path):
    with pytest.raises(DiffImmuneError, match=CLASSIFIER_JSON):
        WorldClassifier.load(tmp_path / "nowhere")


def test_loading_a_truncated_weights_file_names_it(trained, tmp_path):
    classifier, _ = trained
    folder = classifier.save(tmp_path / "classifier")
    weights = folder / CLASSIFIER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DiffImmuneError, match=CLASSIFIER_WEIGHTS):
        WorldClassifier.load(folder)


def test_loading_a_garbage_config_names_it(trained, tmp_path):
    classifier, _ = trained
    folder = classifier.save(tmp_path / "classifier")
    (folder / CLASSIFIER_JSON).write_text("{not json")
    with pytest.raises(DiffImmuneError, match=CLASSIFIER_JSON):
        WorldClassifier.load(folder)


def _train_briefly(seed: int) -> WorldClassifier:
    classifier, _ = train_world_classifier(
        TINY_WORLD, steps=3, batch_size=8, widths=(4, 8, 8, 8), seed=seed, progress=False, validation_size=8
    )
    return classifier


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    first, second, other = _train_briefly(0), _train_briefly(0), _train_briefly(1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.state_dict()["body.0.weight"], other.state_dict()["body.0.weight"])


def test_training_leaves_the_global_random_state_alone():
    before = torch.random.get_rng_state()
    _train_briefly(0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_degrade_stays_in_range_and_changes_images_mildly(held_out_records):
    images = images_to_tensor(held_out_records[:16])
    degraded = degrade(images, torch.Generator().manual_seed(0))
    assert degraded.shape == images.shape
    assert degraded.min() >= 0.0 and degraded.max() <= 1.0
    difference = (degraded - images).abs().mean()
    assert 0.0 < difference < 0.1

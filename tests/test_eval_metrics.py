"""FID and CLIP score (pipelines.evaluation): the statistics and distance maths against independent
computations, the FID Inception network with seeded random weights (and its parity with pytorch-fid's
own forward), and CLIP score with a tiny random CLIP loaded back from a local directory with the
network blocked."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from scipy import linalg

from pipelines.evaluation import fid
from pipelines.evaluation.clip_score import clip_score, load_clip
from pipelines.evaluation.fid import (
    FeatureStats,
    InceptionWeightsNotFound,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    load_inception,
    stats_of_image_batches,
)
from stages.text import TINY_CLIP_CONFIG, TINY_CLIP_NAME

import helpers


def _correlated_gaussian(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(count, dim)) @ mixing + rng.normal(size=dim)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) from eigenvalues: sigma1 sigma2 is similar to the PSD matrix
    sigma1^1/2 sigma2 sigma1^1/2, so its eigenvalues are real and non-negative. An independent route
    from the Schur-based sqrtm that frechet_distance uses."""
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


# ------------------------------------------------------------------ statistics and distance


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = _correlated_gaussian(np.random.default_rng(0), 400, 24)
    total_variance = 2.0 * np.trace(np.cov(features, rowvar=False))
    assert abs(fid_from_features(features, features)) < 1e-6 * total_variance
    distances = [fid_from_features(features, features + shift) for shift in (0.1, 0.5, 2.0)]
    # Same covariance, mean moved by `shift` in every dimension: FID = dim * shift^2.
    np.testing.assert_allclose(distances, [24 * 0.1**2, 24 * 0.5**2, 24 * 2.0**2], rtol=1e-6)
    assert 0 < distances[0] < distances[1] < distances[2]


def test_fid_from_features_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    a, b = _correlated_gaussian(rng, 300, 16), 1.3 * _correlated_gaussian(rng, 250, 16)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sigma_a) + np.trace(sigma_b) \
        - 2.0 * _trace_sqrt_product(sigma_a, sigma_b)
    assert direct > 1.0
    assert fid_from_features(a, b) == pytest.approx(direct, rel=1e-9)
    as_float32_tensors = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert fid_from_features(*as_float32_tensors) == pytest.approx(direct, rel=1e-5)


def test_frechet_distance_closed_form_and_degenerate_covariances(monkeypatch):
    rng = np.random.default_rng(2)
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.5, 2.0, size=8), rng.uniform(0.5, 2.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # Fewer samples than dimensions: singular covariances, whose product's square root carries a
    # rounding-sized imaginary part, still give a finite, positive distance.
    few_a, few_b = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 1.0
    distance = fid_from_features(few_a, few_b)
    assert np.isfinite(distance) and distance > 0
    # A "covariance" with a negative eigenvalue has a truly complex root: an error, not a number.
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    # When the root is not finite, both covariances get eps on the diagonal and the root is retaken.
    sigma1, sigma2 = np.diag(v1), np.diag(v2)
    real_sqrtm = linalg.sqrtm
    calls = []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm_failing_once)
    eps = 1e-3
    shifted = frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (sigma1 + eps * np.eye(8)) @ (sigma2 + eps * np.eye(8)))
    assert shifted == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt((v1 + eps) * (v2 + eps))))
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(mu1, np.diag(v1), mu2[:4], np.diag(v2[:4]))


def test_streaming_stats_equal_batch_stats():
    features = _correlated_gaussian(np.random.default_rng(3), 257, 20) + 50.0  # a large offset: no cancellation
    streaming = FeatureStats(20)
    start = 0
    for size in (1, 100, 0, 37, 119):
        streaming.update(features[start:start + size])
        start += size
    assert start == len(features) and streaming.count == len(features)
    np.testing.assert_allclose(streaming.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(streaming.covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    # Per-worker stats merged give the same as one pass.
    merged = FeatureStats.from_features(features[:90]).merge(FeatureStats.from_features(features[90:]))
    np.testing.assert_allclose(merged.covariance, streaming.covariance, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"expected features \(N, 20\)"):
        streaming.update(features[:, :5])
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats(3).covariance


def test_reference_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    reference = FeatureStats.from_features(_correlated_gaussian(rng, 120, 10))
    path = tmp_path / "reference" / "stats.npz"
    reference.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.count == reference.count and loaded.dim == reference.dim
    np.testing.assert_array_equal(loaded.mean, reference.mean)
    np.testing.assert_allclose(loaded.covariance, reference.covariance, rtol=1e-14)
    # The file has pytorch-fid's keys, so its stats files and ours read the same way.
    with np.load(path) as data:
        assert {"mu", "sigma", "count"} <= set(data.files)
    generated = _correlated_gaussian(rng, 80, 10)
    assert fid_from_stats(FeatureStats.from_features(generated), loaded) == pytest.approx(
        fid_from_stats(FeatureStats.from_features(generated), reference), rel=1e-12)
    # A loaded reference can keep accumulating.
    extra = _correlated_gaussian(rng, 30, 10)
    np.testing.assert_allclose(loaded.update(extra).covariance, reference.update(extra).covariance, rtol=1e-10)
    np.savez(tmp_path / "other.npz", mu=reference.mean)
    with pytest.raises(ValueError, match=r"other.npz: not FID reference stats, missing keys \['sigma', 'count'\]"):
        FeatureStats.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="FID reference stats not found: .*absent.npz"):
        FeatureStats.load(tmp_path / "absent.npz")


# ------------------------------------------------------------------ the Inception network


def _images(seed: int, count: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def random_inception():
    return load_inception(None, random_init_seed=0, device="cpu")


@pytest.fixture(scope="module")
def small_images_and_features(random_inception):
    images = _images(0, 4, 64)
    return images, random_inception(images)


def test_random_inception_maps_images_to_finite_deterministic_features(random_inception, small_images_and_features):
    images, features = small_images_and_features
    assert features.shape == (4, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and features.std() > 0
    large = random_inception(_images(1, 4, 299))
    assert large.shape == (4, 2048) and torch.isfinite(large).all()
    # Channels-first input is the same images; the same seed rebuilds the same network.
    again = load_inception(None, random_init_seed=0, device="cpu")(images.permute(0, 3, 1, 2).numpy())
    assert torch.equal(again, features)
    other_seed = load_inception(None, random_init_seed=1, device="cpu")
    assert not torch.equal(other_seed.inception.Mixed_7c.branch_pool.conv.weight,
                           random_inception.inception.Mixed_7c.branch_pool.conv.weight)


def test_inception_matches_pytorch_fid_forward(random_inception, small_images_and_features, monkeypatch):
    """pytorch-fid's own InceptionV3 (block 3), handed our weights in place of its download, gives our
    features: same architecture, same state-dict keys, same resize and scaling."""
    import pytorch_fid.inception

    state = random_inception.inception.state_dict()
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference_net = pytorch_fid.inception.InceptionV3([3]).eval()
    images, features = small_images_and_features
    with torch.inference_mode():
        expected = reference_net(images.permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1).double()
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_inception_loads_a_local_weights_file(tmp_path, random_inception, small_images_and_features):
    # Written the way older torch saved it: no BatchNorm num_batches_tracked entries.
    state = {k: v for k, v in random_inception.inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / fid.INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
    loaded = load_inception(str(path), device="cpu")
    images, features = small_images_and_features
    streamed = stats_of_image_batches(loaded, [images[:2], images[2:]])
    expected = FeatureStats.from_features(features)
    assert streamed.count == 4
    np.testing.assert_allclose(streamed.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.covariance, expected.covariance, rtol=1e-9, atol=1e-15)

    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth is not the FID Inception state dict"):
        load_inception(str(tmp_path / "wrong.pth"), device="cpu")


def test_missing_inception_weights_raise_a_clear_error(tmp_path):
    missing = tmp_path / "weights" / fid.INCEPTION_WEIGHTS_FILE
    with pytest.raises(InceptionWeightsNotFound) as caught:
        load_inception(str(missing), device="cpu")
    message = str(caught.value)
    assert str(missing) in message
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "pytorch-fid" in message
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(ValueError, match="either weights_path .* or random_init_seed"):
        load_inception(None, device="cpu")
    with pytest.raises(TypeError, match="expected uint8 images"):
        fid.as_uint8_nchw(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------ CLIP score


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup fails, and is recorded: a library that caught the failure and
    fell back quietly would still fail the test at teardown."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"network access attempted in a no-network test: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    return folder, helpers.write_tiny_clip(folder)


def _prompts() -> list[str]:
    things = ["a red apple", "a blue car", "a dog on grass", "a city at night", "a bowl of soup", "snowy mountains"]
    return things + [f"a painting of {thing}" for thing in things]


def test_clip_score_with_a_local_tiny_clip(tiny_clip_dir, no_network):
    folder, original = tiny_clip_dir
    model, tokenizer = load_clip(folder, TINY_CLIP_NAME, model_cfg=TINY_CLIP_CONFIG, device="cpu")
    assert torch.equal(model.visual.conv1.weight, original.visual.conv1.weight)

    images, prompts = _images(5, 12, 40), _prompts()
    result = clip_score(model, tokenizer, images, prompts, batch_size=5)
    assert result.per_image.shape == (12,)
    assert np.all((result.per_image >= 0) & (result.per_image <= 100))
    assert result.mean == pytest.approx(result.per_image.mean())

    # The definition, from the original in-memory model and open_clip's own preprocessing.
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(original)), is_train=False)
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.fromarray(image)) for image in images.numpy()])
        image_embeddings = original.encode_image(pixels, normalize=True)
        cosine = (image_embeddings * original.encode_text(tokenizer(prompts), normalize=True)).sum(-1)
    assert (cosine > 0).any()  # random weights: some pairs score above the clamp, so the check below bites
    np.testing.assert_allclose(result.per_image, 100 * cosine.clamp(min=0).double().numpy(), rtol=1e-5, atol=1e-4)

    # Shuffled prompts: computed, in range; pairs are scored row by row, so permuting images and
    # prompts together permutes the per-image values.
    permutation = [3, 0, 5, 1, 4, 2, 11, 6, 9, 7, 10, 8]
    shuffled = clip_score(model, tokenizer, images, [prompts[i] for i in permutation])
    assert shuffled.per_image.shape == (12,) and np.all((shuffled.per_image >= 0) & (shuffled.per_image <= 100))
    both = clip_score(model, tokenizer, images[permutation], [prompts[i] for i in permutation])
    np.testing.assert_allclose(both.per_image, result.per_image[permutation], rtol=1e-6, atol=1e-6)
    # Channels-first tensors and PIL images score the same as the channels-last batch.
    pil_images = [Image.fromarray(image) for image in images.numpy()]
    np.testing.assert_allclose(clip_score(model, tokenizer, pil_images, prompts).per_image, result.per_image, rtol=1e-6)
    np.testing.assert_allclose(clip_score(model, tokenizer, images.permute(0, 3, 1, 2), prompts).per_image,
                               result.per_image, rtol=1e-6)
    with pytest.raises(ValueError, match="12 images but 2 prompts"):
        clip_score(model, tokenizer, images, prompts[:2])


def test_load_clip_refuses_what_would_be_fetched(tiny_clip_dir, tmp_path, no_network):
    folder, original = tiny_clip_dir
    # A checkpoint file works as well as its directory.
    model, _ = load_clip(folder / "open_clip_model.safetensors", TINY_CLIP_NAME, model_cfg=TINY_CLIP_CONFIG,
                         device="cpu")
    assert torch.equal(model.token_embedding.weight, original.token_embedding.weight)
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint not found: .*absent"):
        load_clip(tmp_path / "absent", TINY_CLIP_NAME, model_cfg=TINY_CLIP_CONFIG, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no unambiguous CLIP checkpoint in .*empty"):
        load_clip(tmp_path / "empty", TINY_CLIP_NAME, model_cfg=TINY_CLIP_CONFIG, device="cpu")
    with pytest.raises(ValueError, match="not a hf-hub: location"):
        load_clip(folder, "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device="cpu")
    hf_text = {**TINY_CLIP_CONFIG,
               "text_cfg": {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base"}}
    with pytest.raises(ValueError, match="needs hf_model_name='xlm-roberta-base'.* from the Hugging Face hub"):
        load_clip(folder, "wurst-test-hf-text-clip", model_cfg=hf_text, device="cpu")
    with pytest.raises(ValueError, match="open_clip has no model config 'no-such-clip'"):
        load_clip(folder, "no-such-clip", device="cpu")

"""FID (Fréchet Inception Distance) from local weights only.

The feature extractor is the TF-ported Inception-v3 ("pt_inception-2015-12-05") that pytorch-fid,
torch-fidelity and torchmetrics use: torchvision's Inception3 with pytorch-fid's FIDInceptionA/C/E
blocks (TensorFlow's pooling quirks), 2048-d pool3 features, input resized to 299x299 bilinearly and
scaled to [-1, 1]. The blocks come from the ``pytorch-fid`` package; its own constructors
(``fid_inception_v3``, ``InceptionV3``) download the weights, so the network is assembled here with
no weights and filled from a local file named in the config.

Statistics are accumulated streaming (``FeatureStats``: count, mean, centred scatter, merged with
Chan's update) so a 50k-image reference set is never held in memory, and saved as ``.npz``
(``mu``/``sigma`` as in pytorch-fid's stats files, plus ``count``) so they are computed once and reused.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines import storage

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
)
FEATURE_DIM = 2048
INPUT_SIZE = 299
# The stats file's format version; bump when the keys or their meaning change.
STATS_FORMAT = 1


class InceptionWeightsNotFound(FileNotFoundError):
    pass


def _weights_missing_message(path: str) -> str:
    return (
        f"FID Inception weights not found: {path}. FID needs the TF-ported Inception-v3 weights "
        f"{INCEPTION_WEIGHTS_FILE} (published by pytorch-fid at {INCEPTION_WEIGHTS_URL}); download "
        f"that file once, put it at a local or object-store path and name that path in the config. "
        f"Nothing is downloaded at run time."
    )


def _build_fid_inception_v3() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3`` architecture, without its download: the same block swaps,
    so the state-dict keys are those of the published weights file."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models.inception import Inception3

    # init_weights=False: the weights are filled afterwards (a file or the seeded test init).
    inception = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def _seeded_init_(module: nn.Module, seed: int) -> None:
    """Deterministic random weights for tests, from a private generator (the global RNG is untouched).
    Kaiming-normal convolutions keep activations O(1) through the ~50 layers, so the pooled features
    are finite and spread out; batch norms are identities (eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
            layer.running_mean.zero_()
            layer.running_var.fill_(1.0)
            layer.num_batches_tracked.zero_()
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.01, generator=generator)
            nn.init.zeros_(layer.bias)


def as_uint8_nchw(images) -> torch.Tensor:
    """uint8 images as (N, 3, H, W) from a tensor or array laid out (N, 3, H, W) or (N, H, W, 3)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a uint8 tensor or array of images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        # Float images have no agreed range ([0, 1], [-1, 1], [0, 255]); uint8 removes the guess.
        raise TypeError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 3:  # channels first wins when both fit (a 3-pixel-high NHWC batch is no use here)
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"expected 3 colour channels, first or last, got shape {tuple(images.shape)}")


@contextlib.contextmanager
def _full_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions default to TF32 on Ampere and later, which moves Inception features by ~1e-3
    relative; FID against stats computed elsewhere needs the same fp32 features CPU and GPU give."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        previous = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


class FIDInceptionFeatures(nn.Module):
    """uint8 images (N, H, W, 3) or (N, 3, H, W) -> (N, 2048) float64 pool3 features, computed in fp32
    exactly as pytorch-fid's ``InceptionV3(output_blocks=[3])``: bilinear resize to 299 (align_corners
    False), scale to [-1, 1], the network up to the final average pool."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    @property
    def device(self) -> torch.device:
        return self.inception.Conv2d_1a_3x3.conv.weight.device

    @torch.inference_mode()
    def forward(self, images) -> torch.Tensor:
        x = as_uint8_nchw(images).to(self.device, non_blocking=True).float() / 255.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        net = self.inception
        with _full_fp32_convolutions():
            x = net.Conv2d_1a_3x3(x)
            x = net.Conv2d_2a_3x3(x)
            x = net.Conv2d_2b_3x3(x)
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = net.Conv2d_3b_1x1(x)
            x = net.Conv2d_4a_3x3(x)
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                         "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(net, name)(x)
            x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        return x.flatten(1).to(torch.float64)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_inception(
    weights_path: str | os.PathLike | None,
    *,
    random_init_seed: int | None = None,
    device: str | torch.device | None = None,
) -> FIDInceptionFeatures:
    """The FID Inception network in eval mode on ``device`` (default: CUDA when available, else CPU).

    ``weights_path``: the local or object-store path of ``pt_inception-2015-12-05-6726825d.pth``
    (read with ``weights_only=True``; a .safetensors copy works too). ``random_init_seed`` replaces the
    weights with seeded random ones and is for tests only; give exactly one of the two.
    """
    if (weights_path is None) == (random_init_seed is None):
        raise ValueError(
            "load_inception: give either weights_path (the FID Inception weights "
            f"{INCEPTION_WEIGHTS_FILE}) or random_init_seed (tests only), not "
            f"{'both' if weights_path is not None else 'neither'}"
        )
    device = torch.device(device) if device is not None else _default_device()
    if weights_path is not None:
        from stages.checkpoint import read_state_dict_file

        weights_uri = os.fspath(weights_path)
        if not storage.exists(weights_uri) or storage.is_dir(weights_uri):
            raise InceptionWeightsNotFound(_weights_missing_message(weights_uri))
        state = {key: value.float() if value.is_floating_point() else value
                 for key, value in read_state_dict_file(storage.local_copy(weights_uri)).items()}
        # Files saved before BatchNorm counted its batches lack num_batches_tracked; torch fills it
        # only from the file's own _metadata, which a plain dict no longer carries.
        for key in [k[: -len("running_mean")] + "num_batches_tracked" for k in state if k.endswith("running_mean")]:
            state.setdefault(key, torch.tensor(0, dtype=torch.long))
        # Built on the meta device: no time spent on an initialisation the file overwrites.
        with torch.device("meta"):
            inception = _build_fid_inception_v3()
        try:
            inception.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{weights_uri} is not the FID Inception state dict {INCEPTION_WEIGHTS_FILE}: {exc}"
            ) from None
    else:
        with torch.device("meta"):
            inception = _build_fid_inception_v3()
        inception = inception.to_empty(device="cpu")
        _seeded_init_(inception, random_init_seed)
    inception.requires_grad_(False)
    return FIDInceptionFeatures(inception).to(device).eval()


# ---------------------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of feature vectors.

    Keeps the count, the mean and the centred scatter matrix sum((x - mean)(x - mean)^T) in float64;
    each batch is folded in with Chan et al.'s pairwise update, which avoids the cancellation of the
    raw sum-of-squares formula. ``covariance`` is the unbiased estimate (np.cov's default, as pytorch-fid).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"FeatureStats: dim must be positive, got {dim}")
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        features = _as_feature_matrix(features)
        stats = cls(features.shape[1])
        stats.update(features)
        return stats

    def update(self, features) -> "FeatureStats":
        """Fold in a batch of features (N, dim); returns self."""
        features = _as_feature_matrix(features, self.dim)
        if features.shape[0] == 0:
            return self
        batch_mean = features.mean(axis=0)
        centred = features - batch_mean
        self._merge(features.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold in the statistics of another set (another worker's shard); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims differ ({self.dim} vs {other.dim})")
        if other.count:
            self._merge(other.count, other.mean, other.scatter)
        return self

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, have {self.count}")
        return self.scatter / (self.count - 1)

    def save(self, uri: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` (pytorch-fid's keys) and ``count`` as .npz (local path or object store)."""
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mean, sigma=self.covariance, count=np.int64(self.count),
                 format_version=np.int64(STATS_FORMAT))
        storage.write_bytes(os.fspath(uri), buffer.getvalue())

    @classmethod
    def load(cls, uri: str | os.PathLike) -> "FeatureStats":
        uri = os.fspath(uri)
        if not storage.exists(uri):
            raise FileNotFoundError(f"FID reference stats not found: {uri}")
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma", "count") if key not in data.files]
            if missing:
                raise ValueError(
                    f"{uri}: not FID reference stats, missing keys {missing} (has {sorted(data.files)})"
                )
            mean = np.asarray(data["mu"], dtype=np.float64)
            covariance = np.asarray(data["sigma"], dtype=np.float64)
            count = int(data["count"])
        if mean.ndim != 1 or covariance.shape != (mean.shape[0], mean.shape[0]) or count < 2:
            raise ValueError(
                f"{uri}: inconsistent FID stats: mu {mean.shape}, sigma {covariance.shape}, count {count}"
            )
        stats = cls(mean.shape[0])
        stats.count, stats.mean, stats.scatter = count, mean, covariance * (count - 1)
        return stats


def _as_feature_matrix(features, dim: int | None = None) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or (dim is not None and features.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, dim)"
        raise ValueError(f"expected features {want}, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features


def stats_of_image_batches(inception: FIDInceptionFeatures, image_batches: Iterable) -> FeatureStats:
    """Feature statistics of a stream of uint8 image batches, holding one batch at a time."""
    stats = FeatureStats(FEATURE_DIM)
    for batch in image_batches:
        stats.update(inception(batch).cpu().numpy())
    return stats


# ---------------------------------------------------------------------------------------- distance


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    As pytorch-fid: when sqrt(sigma1 sigma2) is not finite (a singular product, e.g. fewer samples
    than dimensions) both covariances get ``eps`` on the diagonal; an imaginary part from rounding is
    dropped, a large one is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if largest_imaginary > 1e-3:
            raise ValueError(f"frechet_distance: sqrt(sigma1 sigma2) has imaginary part {largest_imaginary:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    if a.dim != b.dim:
        raise ValueError(f"fid_from_stats: feature dims differ ({a.dim} vs {b.dim})")
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def fid_from_features(a, b) -> float:
    """FID between two feature sets (N, dim) and (M, dim)."""
    return fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))


__all__ = [
    "FEATURE_DIM",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FIDInceptionFeatures",
    "FeatureStats",
    "InceptionWeightsNotFound",
    "as_uint8_nchw",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "load_inception",
    "stats_of_image_batches",
]

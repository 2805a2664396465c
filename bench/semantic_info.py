"""How much of each demo caption attribute the Semantic Compressor's latent carries: a linear read-out
(ridge, one-vs-rest) of background, object colour, shape, size and position from the latents of the
demo images, trained on 70% and scored on the rest, next to chance. Stage B can only draw what this
latent (or the text) tells it, and Stage C can only learn to predict what is in it.

    python bench/semantic_info.py [--data-root data] [--resolution 96] [--images 1500] \
        [--compressor data/runs/<stage B run>/export/semantic ...]

Compares the compressor the demo's encoders phase wrote with the raw pixels average-pooled to the
latent's grid (what a linear read-out gets from colour averages alone).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def demo_samples(data_root: str, limit: int) -> tuple[torch.Tensor, list[dict]]:
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.evaluation import probe

    table = pq.read_table(os.path.join(data_root, "demo", "metadata")).to_pydict()
    seen, images, labels = set(), [], []
    for url, text in zip(table["URL"], table["TEXT"]):
        name = url.rsplit("/", 1)[-1]
        path = os.path.join(data_root, "demo", "images", name)
        if "/images/" not in url or name in seen or not os.path.exists(path):
            continue
        try:
            label = probe.parse_caption(text)
        except ValueError:  # the one caption the demo's caption filter drops
            continue
        seen.add(name)
        images.append(np.asarray(Image.open(path).convert("RGB")))
        labels.append(label)
        if len(images) == limit:
            break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0, labels


def readout_accuracy(features: np.ndarray, labels: list[dict], seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    cut = int(0.7 * len(features))
    train, test = order[:cut], order[cut:]
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    out = {}
    for attribute in ATTRIBUTES:
        values = sorted({label[attribute] for label in labels})
        y = np.array([values.index(label[attribute]) for label in labels])
        targets = np.eye(len(values))[y]
        a = x[train]
        weights = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ targets[train])
        out[attribute] = float(((x[test] @ weights).argmax(1) == y[test]).mean())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--compressor", action="append", default=[], metavar="DIR",
                        help="also read out this compressor, e.g. a Stage B run's export/semantic (fine-tuned)")
    args = parser.parse_args(argv)

    import stages
    torch.manual_seed(0)
    (semantic_dir,) = glob.glob(os.path.join(args.data_root, "encoders", "*", "semantic"))[:1]
    images, labels = demo_samples(args.data_root, args.images)
    print(f"{len(images)} demo images, semantic input {args.resolution} px")
    rows = {}
    with torch.no_grad():
        written = stages.load(semantic_dir).eval()
        rows["compressor as written (output BN calibrated)"] = written.encode(images, args.resolution)
        for path in args.compressor:
            from pipelines import export_layout

            tuned = stages.load(export_layout.resolve_checkpoint(path), expected_kind="semantic").eval()
            rows[f"compressor {os.path.basename(os.path.dirname(os.path.dirname(path.rstrip('/'))))[:40]}"] = \
                tuned.encode(images, args.resolution)
        grid = rows["compressor as written (output BN calibrated)"].shape[-1]
        rows[f"pixels pooled to {grid}x{grid}"] = F.adaptive_avg_pool2d(
            F.interpolate(images, size=args.resolution, mode="bilinear", antialias=True), grid)
    chance = {"background": 1 / 5, "colour": 1 / 8, "shape": 1 / 5, "size": 1 / 2, "position": 1 / 5}
    print(f"{'latent':<48}" + "".join(f"{a:>11}" for a in ATTRIBUTES))
    for name, latents in rows.items():
        accuracy = readout_accuracy(latents.flatten(1).double().numpy(), labels)
        print(f"{name:<48}" + "".join(f"{accuracy[a]:11.2f}" for a in ATTRIBUTES))
    print(f"{'chance':<48}" + "".join(f"{chance[a]:11.2f}" for a in ATTRIBUTES))


if __name__ == "__main__":
    main()

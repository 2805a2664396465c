"""Tests of the demo attribute probe (pipelines/evaluation/probe.py) on images drawn by demo_data.draw:
clean, JPEG re-encoded (as img2dataset does), noisy and downscaled; captions; scoring; unseen prompts."""

from __future__ import annotations

import functools
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.demo_data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, draw
from pipelines.evaluation import probe

# An object is distinguishable from its background when their palette colours are this far apart in
# RGB. The closest pair the demo can draw is white on beige (62); the only pairs below are white on
# white and black on black (8.7), which the demo replaces by a grey background.
DISTINGUISHABLE = 50.0
JPEG_QUALITY = 75  # harsher than img2dataset's default 95
NOISE_SIGMA = 10.0
MIN_ACCURACY = 0.99


def palette_distance(colour: str, background: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[colour], BACKGROUNDS[background])))


EXCLUDED_PAIRS = [(c, b) for c in COLOURS for b in BACKGROUNDS if palette_distance(c, b) <= DISTINGUISHABLE]


def combinations() -> list[dict]:
    """Every (colour, background) pair, 5 images each: every shape and every position once per pair,
    and over the pairs every shape meets every (position, size)."""
    combos = []
    for k, (colour, background) in enumerate(itertools.product(COLOURS, BACKGROUNDS)):
        for j, shape in enumerate(SHAPES):
            combos.append({"shape": shape, "colour": colour, "background": background,
                           "position": list(POSITIONS)[(j + k) % len(POSITIONS)],
                           "size": list(SIZES)[(j + k) % len(SIZES)]})
    return combos


def draw_combo(combo: dict, px: int, rng) -> Image.Image:
    return draw(combo["shape"], combo["colour"], combo["background"], combo["position"], combo["size"], px, rng)


def jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def noisy(image: Image.Image, rng, sigma: float = NOISE_SIGMA) -> Image.Image:
    array = np.asarray(image, np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8))


def downscaled(image: Image.Image) -> Image.Image:
    return image.resize((128, 128), Image.LANCZOS)


VARIANTS = {
    "clean": lambda image, rng: image,
    "jpeg": lambda image, rng: jpeg(image),
    "noisy": lambda image, rng: noisy(image, rng),
    "noisy_jpeg": lambda image, rng: jpeg(noisy(image, rng)),
    "downscaled": lambda image, rng: downscaled(image),
    "downscaled_jpeg": lambda image, rng: jpeg(downscaled(image)),
}


@functools.lru_cache(maxsize=None)
def measured(px: int, variant: str) -> tuple[dict, list]:
    """Accuracy per attribute over the distinguishable combinations, and the misreads."""
    rng = np.random.default_rng(px)  # draw()'s jitter and the noise
    combos = [c for c in combinations() if (c["colour"], c["background"]) not in EXCLUDED_PAIRS]
    hits = np.zeros(len(probe.ATTRIBUTES))
    misreads = []
    for combo in combos:
        read = probe.read_image(VARIANTS[variant](draw_combo(combo, px, rng), rng))
        correct = np.array([read[a] == combo[a] for a in probe.ATTRIBUTES])
        hits += correct
        misreads += [(a, combo, read[a]) for a, ok in zip(probe.ATTRIBUTES, correct) if not ok]
    return dict(zip(probe.ATTRIBUTES, (hits / len(combos)).round(4))), misreads


def test_excluded_pairs_are_only_same_name_pairs():
    # The demo never draws these (object colour == background -> grey background).
    assert EXCLUDED_PAIRS == [("white", "white"), ("black", "black")]


@pytest.mark.parametrize("px,variant", [(128, "clean"), (128, "jpeg"), (128, "noisy"), (128, "noisy_jpeg"),
                                        (256, "clean"), (256, "jpeg"), (256, "noisy"), (256, "downscaled"),
                                        (256, "downscaled_jpeg")])
def test_reads_every_attribute_of_drawn_images(px, variant):
    accuracy, misreads = measured(px, variant)
    assert all(v >= MIN_ACCURACY for v in accuracy.values()), (accuracy, misreads[:10])


@pytest.mark.parametrize("colour", ["white", "black"])
def test_indistinguishable_object_reads_as_no_object(colour):
    read = probe.read_image(draw("square", colour, colour, "centre", "large", 128, np.random.default_rng(0)))
    assert read["object"] is False and read["background"] == colour


@pytest.mark.parametrize("px", [128, 256])
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_plain_background_reads_as_no_object(px, background):
    rng = np.random.default_rng(3)
    plain = Image.new("RGB", (px, px), BACKGROUNDS[background])
    for image in (plain, jpeg(noisy(plain, rng))):
        read = probe.read_image(image)
        assert read["background"] == background
        assert read["object"] is False
        assert [read[a] for a in ("colour", "position", "shape", "size")] == [None] * 4


def test_blob_that_is_no_demo_shape_reads_as_no_shape():
    image = Image.new("RGB", (128, 128), BACKGROUNDS["grey"])
    ImageDraw.Draw(image).ellipse([20, 50, 110, 80], fill=COLOURS["red"])  # 3:1, unlike any template
    read = probe.read_image(image)
    assert (read["object"], read["colour"], read["position"], read["shape"]) == (True, "red", "centre", None)
    assert read["shape_iou"] < probe.MIN_SHAPE_IOU


def test_array_input_reads_like_pil_input():
    image = draw("diamond", "orange", "light blue", "bottom left", "small", 256, np.random.default_rng(5))
    assert probe.read_image(np.asarray(image)) == probe.read_image(image)
    assert probe.read_image(image)["shape"] == "diamond"


@pytest.mark.parametrize("bad", [np.zeros((64, 80, 3), np.uint8), np.zeros((64, 64, 3), np.float32),
                                 np.zeros((64, 64), np.uint8)])
def test_read_image_rejects_non_square_or_non_rgb_uint8(bad):
    with pytest.raises(ValueError, match="expected"):
        probe.read_image(bad)


def test_parse_caption_round_trips_every_demo_caption():
    for size, colour, shape, position, background in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS,
                                                                        BACKGROUNDS):
        expected = {"background": background, "colour": colour, "position": position, "shape": shape,
                    "size": size}
        text = probe.caption(size, colour, shape, position, background)
        assert text == f"a {size} {colour} {shape} at the {position} on a {background} background"
        assert probe.parse_caption(text) == expected
        assert probe.parse_caption(text.replace(" on a ", " over a ")) == expected  # the duplicates' wording


@pytest.mark.parametrize("text", ["shape", "a red car", "a small pink circle at the centre on a grey background",
                                  "a small red circle at the middle on a grey background",
                                  "a small red circle at the centre on a grey background with a cat"])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a demo caption"):
        probe.parse_caption(text)


def test_score_counts_per_attribute_and_per_prompt():
    rng = np.random.default_rng(7)
    red_circle = "a large red circle at the top left on a white background"
    blue_cross = "a small blue cross at the centre on a beige background"
    images = [draw("circle", "red", "white", "top left", "large", 128, rng),
              draw("circle", "red", "white", "top left", "large", 256, rng),
              draw("cross", "green", "beige", "centre", "small", 128, rng),  # wrong colour
              Image.new("RGB", (128, 128), BACKGROUNDS["beige"])]  # nothing drawn
    result = probe.score(images, [red_circle, red_circle, blue_cross, blue_cross])
    json.dumps(result)
    assert result["chance"] == {"background": 1 / 5, "colour": 1 / 8, "position": 1 / 5, "shape": 1 / 5,
                                "size": 1 / 2, "all": pytest.approx(1 / 2000)}
    assert result["accuracy"] == {"background": 1.0, "colour": 0.5, "position": 0.75, "shape": 0.75,
                                  "size": 0.75, "all": 0.5}
    assert result["no_object"] == 1
    assert result["per_prompt"][red_circle] == {"n_images": 2, "accuracy": dict.fromkeys(
        probe.ATTRIBUTES + ("all",), 1.0)}
    assert result["per_prompt"][blue_cross]["accuracy"] == {"background": 1.0, "colour": 0.0, "position": 0.5,
                                                            "shape": 0.5, "size": 0.5, "all": 0.0}
    assert result["per_image"][2]["read"]["colour"] == "green"
    assert result["per_image"][2]["expected"]["colour"] == "blue"
    table = probe.format_table(result)
    assert red_circle in table and blue_cross in table
    assert "colour          0.500   0.1250" in table

    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        probe.score(images, [red_circle] * 3)


def demo_like_captions(n: int, seed: int) -> list[str]:
    """Captions drawn the way demo_data.generate draws them, with its " over a " duplicates and a bad caption."""
    rng = np.random.default_rng(seed)
    captions = ["shape"]
    for _ in range(n):
        colour, background = list(COLOURS)[rng.integers(8)], list(BACKGROUNDS)[rng.integers(5)]
        text = probe.caption(list(SIZES)[rng.integers(2)], colour, SHAPES[rng.integers(5)],
                             list(POSITIONS)[rng.integers(5)], "grey" if colour == background else background)
        captions.append(text.replace(" on a ", " over a ") if rng.random() < 0.05 else text)
    return captions


def quad(attributes: dict) -> tuple:
    return attributes["colour"], attributes["shape"], attributes["position"], attributes["background"]


def test_unseen_prompts_are_unseen_spread_and_deterministic():
    training = demo_like_captions(2000, seed=0)
    seen = {quad(probe.parse_caption(t)) for t in training[1:]}
    prompts = probe.unseen_prompts(training, probe.DEMO_EVAL_PROMPT_COUNT, seed=0)
    parsed = [probe.parse_caption(p) for p in prompts]
    assert len(prompts) == probe.DEMO_EVAL_PROMPT_COUNT
    assert not {quad(a) for a in parsed} & seen
    assert len({quad(a) for a in parsed}) == len(parsed)
    assert all(a["colour"] != a["background"] for a in parsed)
    assert {a["colour"] for a in parsed} == set(COLOURS)
    assert {a["background"] for a in parsed} == set(BACKGROUNDS)
    assert {a["position"] for a in parsed} == set(POSITIONS)
    assert {a["size"] for a in parsed} == set(SIZES)
    assert probe.unseen_prompts(training, probe.DEMO_EVAL_PROMPT_COUNT, seed=0) == prompts
    assert probe.unseen_prompts(list(reversed(training)), probe.DEMO_EVAL_PROMPT_COUNT, seed=0) == prompts
    assert probe.unseen_prompts(training, probe.DEMO_EVAL_PROMPT_COUNT, seed=1) != prompts


def test_unseen_prompts_prefer_an_unseen_colour_background_pair():
    everything_but_red_on_beige = [probe.caption("small", c, s, p, b) for c, s, p, b in
                                   itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
                                   if c != b and (c, b) != ("red", "beige")]
    prompts = [probe.parse_caption(p) for p in probe.unseen_prompts(everything_but_red_on_beige, 5, seed=0)]
    assert {(a["colour"], a["background"]) for a in prompts} == {("red", "beige")}
    assert {a["position"] for a in prompts} == set(POSITIONS)
    assert {a["shape"] for a in prompts} == set(SHAPES)


def test_unseen_prompts_refuse_when_too_few_are_unseen():
    all_but_one = [probe.caption("large", c, s, p, b) for c, s, p, b in
                   itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS) if c != b][1:]
    assert len(probe.unseen_prompts(all_but_one, 1, seed=0)) == 1
    with pytest.raises(ValueError, match="only 1 unseen"):
        probe.unseen_prompts(all_but_one, 2, seed=0)

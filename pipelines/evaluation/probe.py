"""The demo attribute probe: does a model trained on the demo dataset draw what its prompt says?

`read_image` reads background, object colour, position, size and shape back from an image's pixels
(palettes and geometry from `pipelines.demo_data`), `parse_caption` reads them from a demo caption,
`score` compares the two over a set of generated images, and `unseen_prompts` picks demo prompts
whose attribute combination never occurs in the training captions (does the model compose, or recall?).
Pure functions over numpy and PIL.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image, ImageFilter

from pipelines.demo_data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, draw

ATTRIBUTES = ("background", "colour", "position", "shape", "size")
PALETTES = {"background": list(BACKGROUNDS), "colour": list(COLOURS), "position": list(POSITIONS),
            "shape": list(SHAPES), "size": list(SIZES)}
CHANCE = {attribute: 1.0 / len(names) for attribute, names in PALETTES.items()}

DEMO_EVAL_PROMPT_COUNT = 12  # prompts the demo generates and probes at the end of `make demo`
DEMO_EVAL_SEED = 0

# Images are read at this size: larger ones are box-downscaled (which also averages noise), smaller
# ones bilinearly upscaled, so the pixel filters and thresholds below mean the same for any input.
WORK_PX = 128
# RGB distance from the background colour under which a pixel is background. The closest
# object/background pair the demo draws (white on beige) is 62 apart; a 3x3 median filter brings
# sigma-10 noise to ~4 per channel, so 24 is far above noise and below half the closest pair.
MIN_OBJECT_DISTANCE = 24.0
# The threshold is at least this many times the median distance of border pixels from their median
# colour (for Gaussian noise that median is ~1.5 sigma, so background noise crosses it ~0.2% of the time).
NOISE_MARGIN = 2.5
# Fewer object pixels than this (a quarter of the smallest demo shape, a small triangle) -> no object.
MIN_OBJECT_FRACTION = 0.01
# A best template IoU below this means the blob is no demo shape: shape None (wrong), not a guess.
# Drawn demo shapes score >= 0.9 clean, noisy or JPEG'd and >= 0.84 blurred (Gaussian radius 3);
# a 3:1 ellipse scores 0.57 (against the cross).
MIN_SHAPE_IOU = 0.7

_CAPTION = re.compile(
    r"a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) at the (?P<position>{}) (?:on|over) a (?P<background>{}) background"
    .format(*("|".join(re.escape(name) for name in PALETTES[a])
              for a in ("size", "colour", "shape", "position", "background"))))


def caption(size: str, colour: str, shape: str, position: str, background: str) -> str:
    """The demo's caption for these attributes (the wording of `demo_data.generate`)."""
    return f"a {size} {colour} {shape} at the {position} on a {background} background"


def parse_caption(text: str) -> dict:
    """Attributes of a demo caption ("... on a ..." or the duplicates' "... over a ..." wording)."""
    match = _CAPTION.fullmatch(" ".join(str(text).split()).lower())
    if match is None:
        raise ValueError(f"not a demo caption: {text!r}; expected 'a <size> <colour> <shape> at the <position> "
                         f"on a <background> background' with the palettes of pipelines.demo_data")
    return {attribute: match.group(attribute) for attribute in ATTRIBUTES}


def is_demo_caption(text: str) -> bool:
    """Whether a caption is one of the demo's drawn captions (the probe applies to it)."""
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


def _nearest(palette: dict, rgb_or_xy) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], np.float64) - np.asarray(rgb_or_xy), axis=1)
    return names[int(np.argmin(distances))]


class _NoJitter:
    """Stands in for draw()'s rng so that a template lands exactly on its position's centre."""

    @staticmethod
    def uniform(low, high, size):
        return np.zeros(size)


@functools.lru_cache(maxsize=64)
def _template(shape: str, size: str, px: int) -> np.ndarray:
    """The shape as `demo_data.draw` renders it at px, centred on a 2px x 2px canvas (centre at (px, px)),
    so any centre in the image is a slice of it."""
    drawn = np.asarray(draw(shape, "white", "black", "centre", size, px, _NoJitter()))[..., 0] > 127
    canvas = np.zeros((2 * px, 2 * px), bool)
    canvas[px // 2: px // 2 + px, px // 2: px // 2 + px] = drawn
    canvas.flags.writeable = False
    return canvas


def _template_at(shape: str, size: str, px: int, centre_xy) -> np.ndarray:
    """The template's mask in a px image with its drawing centre at centre_xy (pixel coordinates)."""
    x0, y0 = (int(round(px - np.clip(c, 0, px))) for c in centre_xy)
    return _template(shape, size, px)[y0: y0 + px, x0: x0 + px]


def _centre_candidates(shape: str, size: str, px: int, xs: np.ndarray, ys: np.ndarray) -> list:
    """Where this template's drawing centre would be for the object mask, two ways: from the bounding
    box (exact for a clean mask; a side cut by the image border is replaced by the far side minus the
    radius) and from the centroid (robust to stray pixels; a triangle's centroid lies r/3 below its
    drawing centre)."""
    radius = SIZES[size] * px
    bbox_centre = []
    for low, high in ((xs.min(), xs.max() + 1), (ys.min(), ys.max() + 1)):
        cut_low, cut_high = low <= 0, high >= px
        bbox_centre.append(high - radius if cut_low and not cut_high
                           else low + radius if cut_high and not cut_low else (low + high) / 2)
    drop = radius / 3 if shape == "triangle" else 0.0
    return [tuple(bbox_centre), (xs.mean() + 0.5, ys.mean() + 0.5 - drop)]


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected a PIL image or an HxWx3 uint8 array, got {array.dtype} {array.shape}")
        image = Image.fromarray(array)
    if image.width != image.height or image.width < 16:
        raise ValueError(f"expected a square image of at least 16 px, got {image.width}x{image.height}")
    return image


def read_image(image) -> dict:
    """Attributes of a demo-style image read from its pixels (a PIL image or an HxWx3 uint8 array, square).

    Background: the BACKGROUNDS entry nearest the median colour of a ring just inside the image
    border. Object pixels: farther than MIN_OBJECT_DISTANCE from that colour and closer to the object's colour
    than to the background's (antialiased or blurred edge pixels split at the midpoint, so the area
    stays right); the object colour is first estimated from the farther half of the candidates.
    Colour: nearest COLOURS entry to the median object pixel. Position: nearest POSITIONS entry to
    the object's centroid. Size: the SIZES entry whose shapes' areas (as `draw` renders them) are
    nearest in log area (small shapes cover 4-8% of the image, large ones 13-27%). Shape: the
    `draw` template (any shape, either size, centred from the mask) with the best IoU with the mask,
    None when even that IoU is below MIN_SHAPE_IOU. Too few object pixels -> object False and colour,
    position, shape and size None. Also returned: the measured RGBs, the object's area fraction,
    centroid and the best IoU, for diagnosis.
    """
    image = _as_rgb_image(image)
    if image.width != WORK_PX:
        image = image.resize((WORK_PX, WORK_PX), Image.BOX if image.width > WORK_PX else Image.BILINEAR)
    px = WORK_PX
    rgb = np.asarray(image.filter(ImageFilter.MedianFilter(3)), np.float32)  # noise and JPEG speckle

    # The background: the median colour of a ring just inside the border. Not the outermost pixels:
    # decoders (Stage A) often render those in another tone than the rest of the background.
    ring, inset = max(1, px // 64), max(2, px // 32)
    band = rgb[inset:px - inset, inset:px - inset]
    border = np.concatenate([band[:ring].reshape(-1, 3), band[-ring:].reshape(-1, 3),
                             band[ring:-ring, :ring].reshape(-1, 3), band[ring:-ring, -ring:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    read = {"background": _nearest(BACKGROUNDS, background_rgb), "colour": None, "position": None,
            "shape": None, "size": None, "object": False, "background_rgb": background_rgb.round(1).tolist(),
            "object_rgb": None, "object_fraction": 0.0, "centroid": None, "shape_iou": None}

    from_background = np.linalg.norm(rgb - background_rgb, axis=-1)
    # Noisier than the median filter can absorb: raise the threshold above the border's own spread.
    threshold = max(MIN_OBJECT_DISTANCE, NOISE_MARGIN * float(np.median(np.linalg.norm(border - background_rgb, axis=1))))
    candidate = from_background > threshold
    if candidate.mean() < MIN_OBJECT_FRACTION:
        return read
    core = candidate & (from_background >= np.median(from_background[candidate]))
    object_rgb = np.median(rgb[core], axis=0)
    mask = candidate & (np.linalg.norm(rgb - object_rgb, axis=-1) < from_background)
    # A 3x3 majority vote drops isolated noise pixels that would skew centroid, area and IoU.
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))) > 127
    object_fraction = float(mask.mean())
    read["object_fraction"] = round(object_fraction, 5)
    if object_fraction < MIN_OBJECT_FRACTION:
        return read

    ys, xs = np.nonzero(mask)
    object_rgb = np.median(rgb[mask], axis=0)
    centroid = ((xs.mean() + 0.5) / px, (ys.mean() + 0.5) / px)
    size_log_gap = {size: min(abs(np.log(object_fraction) - np.log(_template(shape, size, px).sum() / px ** 2))
                              for shape in SHAPES) for size in SIZES}
    best_iou, best_shape = -1.0, None
    for shape in SHAPES:
        for size in SIZES:
            for centre in _centre_candidates(shape, size, px, xs, ys):
                template = _template_at(shape, size, px, centre)
                intersection = np.count_nonzero(template & mask)
                iou = intersection / (np.count_nonzero(template) + xs.size - intersection)
                if iou > best_iou:
                    best_iou, best_shape = iou, shape
    read.update({
        "object": True, "colour": _nearest(COLOURS, object_rgb), "position": _nearest(POSITIONS, centroid),
        "size": min(size_log_gap, key=size_log_gap.get),
        "shape": best_shape if best_iou >= MIN_SHAPE_IOU else None,
        "object_rgb": object_rgb.round(1).tolist(), "centroid": [round(float(c), 4) for c in centroid],
        "shape_iou": round(float(best_iou), 4)})
    return read


def score(images, prompts) -> dict:
    """Probe each image against its prompt (same order, same length; prompts are demo captions).

    Returns (JSON-serialisable): n_images; accuracy and chance per attribute, plus "all" (every
    attribute right; chance = the product); no_object (images with nothing read); per_prompt
    {prompt: {n_images, accuracy per attribute and "all"}}; per_image [{prompt, expected, read, correct}].
    A None read (no object, unrecognised shape) counts as wrong.
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"score: {len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("score: no images")
    per_image = []
    for image, prompt in zip(images, prompts):
        expected, read = parse_caption(prompt), read_image(image)
        correct = {a: read[a] == expected[a] for a in ATTRIBUTES}
        correct["all"] = all(correct.values())
        per_image.append({"prompt": prompt, "expected": expected, "read": read, "correct": correct})
    columns = ATTRIBUTES + ("all",)
    hits = np.array([[row["correct"][c] for c in columns] for row in per_image], np.float64)
    prompt_of = np.array([row["prompt"] for row in per_image])
    per_prompt = {}
    for prompt in dict.fromkeys(prompts):
        rows = hits[prompt_of == prompt]
        per_prompt[prompt] = {"n_images": int(len(rows)),
                              "accuracy": {c: round(float(v), 4) for c, v in zip(columns, rows.mean(axis=0))}}
    chance = dict(CHANCE, all=float(np.prod(list(CHANCE.values()))))
    return {"n_images": len(per_image),
            "accuracy": {c: round(float(v), 4) for c, v in zip(columns, hits.mean(axis=0))},
            "chance": chance,
            "no_object": sum(not row["read"]["object"] for row in per_image),
            "per_prompt": per_prompt, "per_image": per_image}


def format_table(result: dict) -> str:
    """`score`'s result as text: accuracy vs chance per attribute, then one row per prompt."""
    columns = ATTRIBUTES + ("all",)
    short = {"background": "bg", "position": "pos"}
    lines = [f"attribute probe: {result['n_images']} images, {result['no_object']} with no object read",
             f"{'attribute':<12}{'accuracy':>9}{'chance':>9}"]
    lines += [f"{c:<12}{result['accuracy'][c]:>9.3f}{result['chance'][c]:>9.4f}" for c in columns]
    width = max(len("prompt"), *(len(p) for p in result["per_prompt"]))
    lines += ["", f"{'prompt':<{width}}  {'n':>3}" + "".join(f"{short.get(c, c):>7}" for c in columns)]
    for prompt, row in result["per_prompt"].items():
        lines.append(f"{prompt:<{width}}  {row['n_images']:>3}"
                     + "".join(f"{row['accuracy'][c]:>7.2f}" for c in columns))
    return "\n".join(lines)


def unseen_prompts(training_captions, n: int = DEMO_EVAL_PROMPT_COUNT, seed: int = DEMO_EVAL_SEED) -> list[str]:
    """n demo captions whose (colour, shape, position, background) never occurs in training_captions.

    Choice: among all combinations with colour != background (the demo never draws those) whose
    quadruple is unseen, prefer first those whose (colour, background) and (colour, position) pairs
    are unseen too (two novel pairs before one before none); within a preference level pick
    greedily to spread the prompts: least-used colour first, then least-used background + position,
    then shape, then size; ties broken by a permutation drawn from `seed`. Each quadruple is used
    once. Training captions that are not demo captions are ignored. Deterministic for a seed; raises
    ValueError when fewer than n unseen quadruples exist.
    """
    seen_quads, seen_colour_background, seen_colour_position = set(), set(), set()
    for text in training_captions:
        try:
            a = parse_caption(text)
        except ValueError:
            continue
        seen_quads.add((a["colour"], a["shape"], a["position"], a["background"]))
        seen_colour_background.add((a["colour"], a["background"]))
        seen_colour_position.add((a["colour"], a["position"]))
    candidates = [(c, s, p, b, z) for c in COLOURS for s in SHAPES for p in POSITIONS for b in BACKGROUNDS
                  for z in SIZES if c != b and (c, s, p, b) not in seen_quads]
    if len({cand[:4] for cand in candidates}) < n:
        raise ValueError(f"unseen_prompts: only {len({cand[:4] for cand in candidates})} unseen "
                         f"(colour, shape, position, background) combinations, {n} asked for")
    tie_rank = np.random.default_rng(seed).permutation(len(candidates))
    novelty = [((c, b) not in seen_colour_background) + ((c, p) not in seen_colour_position)
               for c, s, p, b, z in candidates]
    uses = {name: 0 for palette in (COLOURS, SHAPES, POSITIONS, SIZES) for name in palette}
    # Backgrounds are counted apart: they share the names "white" and "black" with colours.
    background_uses = dict.fromkeys(BACKGROUNDS, 0)
    chosen, used_quads = [], set()
    while len(chosen) < n:
        def preference(i):
            c, s, p, b, z = candidates[i]
            return (-novelty[i], uses[c], background_uses[b] + uses[p], uses[s], uses[z], tie_rank[i])

        best = min((i for i, cand in enumerate(candidates) if cand[:4] not in used_quads), key=preference)
        c, s, p, b, z = candidates[best]
        used_quads.add((c, s, p, b))
        for name in (c, s, p, z):
            uses[name] += 1
        background_uses[b] += 1
        chosen.append(caption(z, c, s, p, b))
    return chosen

"""Where the demo's text-to-image chain loses the prompt: the attribute probe
(`pipelines.evaluation.probe`) on each link of the chain, from a finished `make demo`'s data root.

    python bench/adherence.py [--data-root data] [--samples 48] [--steps-b 12] [--guidance-b 1]

1. Stage A decoding the true Stage A latents of training samples (the decoder's ceiling);
2. Stage B sampling from the true semantic latent + the caption's text states, decoded by Stage A (with a
   compressor fine-tuned by Stage B: its latent of the stored pixels); then with the empty caption instead
   (does Stage B use its text at all?);
3. Stage C sampling from the caption's text alone, then B and A (the whole chain), on training
   captions and on prompts whose combinations the training captions lack.
Each row: accuracy per attribute against the caption, next to chance.

`--text-use` adds how much Stage B reads its text on those samples (read-outs only, no probe): the share of
attention its attention blocks give the object-colour token and all 77 text tokens, |eps(text) - eps(empty
caption)| against |eps - eps(no latent)|, and the gradient norms of the text path (clip_mapper, attention)
against the latent's (effnet_mappers) under Stage B's training loss.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def latest(pattern: str) -> str:
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"nothing matches {pattern}: run `make demo` first")
    return found[-1]


def run_of(data_root: str, stage: str) -> str:
    runs = [d for d in glob.glob(os.path.join(data_root, "runs", "*"))
            if os.path.exists(os.path.join(d, "run.json")) and
            json.load(open(os.path.join(d, "run.json"))).get("stage") == stage]
    if not runs:
        raise SystemExit(f"no Stage {stage.upper()} run under {data_root}/runs: run `make demo` first")
    return max(runs, key=os.path.getmtime)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps-c", default="20")
    parser.add_argument("--steps-b", type=int, default=12)
    parser.add_argument("--guidance-c", type=float, default=3.0)
    parser.add_argument("--guidance-b", type=float, default=1.0)
    parser.add_argument("--unseen", type=int, default=12)
    parser.add_argument("--text-use", action="store_true", help="also print how much Stage B reads its text")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    from pipelines import export_layout, generate
    from pipelines.evaluate import training_captions
    from pipelines.evaluation import probe
    from pipelines.generate import to_pil
    from pipelines.latent_shards import LatentDataset
    from stages import sampling

    c_export = export_layout.latest_dir(os.path.join(run_of(args.data_root, "c"), "export"))
    models = generate.load_generation_models(c_export, device="cpu", dtype=torch.float32)
    # The newest Stage B run's export, not the copy in the Stage C export (the Stage B of the day C trained).
    import stages

    b_run = run_of(args.data_root, "b")
    b_dir = export_layout.resolve_checkpoint(os.path.join(b_run, "export", "stage_b"))
    models.stage_b = stages.load(b_dir, expected_kind="stage_b", device="cpu", dtype=torch.float32)
    models.check()
    record = json.load(open(os.path.join(c_export, export_layout.EXPORT_RECORD)))
    latents = record["input"]  # Stage C's: text and semantic latents (of the fine-tuned compressor, if any)
    # Links 1-2 read Stage B's input: with a fine-tuned compressor (semantic_compressor.train) the true semantic
    # latent is that compressor's output on the stored pixels, as Stage B saw it in training.
    b_input = json.load(open(os.path.join(b_run, "run.json")))["input"]
    columns = json.load(open(os.path.join(b_input, "manifest.json")))["columns"]
    compressor = None
    if "semantic_image" in columns:
        compressor = stages.load(export_layout.resolve_checkpoint(os.path.join(b_run, "export", "semantic")),
                                 expected_kind="semantic", device="cpu", dtype=torch.float32)
    wanted = ["caption", "text_emb", "stage_a", "semantic_image" if compressor is not None else "semantic"]
    reader = LatentDataset(b_input, wanted, shuffle=True, seed=1, infinite=False, batch_size=args.samples)
    batch = next(iter(reader))
    if compressor is not None:
        with torch.no_grad():
            images = batch["semantic_image"].float() / 255.0
            batch["semantic"] = compressor.encode(images, size=tuple(images.shape[-2:]))
    captions = [c for c in batch["caption"]]
    keep = [i for i, c in enumerate(captions) if probe.is_demo_caption(c)]
    captions = [captions[i] for i in keep]
    if args.text_use:
        text_use(models, batch, keep, captions, b_run)
    rows = {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        stage_a_latents = batch["stage_a"][keep].float()
        rows["1 Stage A decodes the true Stage A latents"] = probe.score(
            to_pil(models.stage_a.decode(stage_a_latents).clamp(0, 1)), captions)
        text = models.text_b.encode(captions)
        uncond = models.text_b.empty_embedding().expand_as(text)
        sampled = sampling.sample_stage_b(models.stage_b, batch["semantic"][keep].float(), text, uncond,
                                          shape=tuple(stage_a_latents.shape), timesteps=args.steps_b,
                                          guidance=args.guidance_b, generator=generator)
        rows["2 Stage B from the true semantic latent + text"] = probe.score(
            to_pil(models.stage_a.decode(sampled).clamp(0, 1)), captions)
        # The same with the empty caption: equal rows mean Stage B draws from the latent alone, ignoring its text.
        sampled = sampling.sample_stage_b(models.stage_b, batch["semantic"][keep].float(), uncond, uncond,
                                          shape=tuple(stage_a_latents.shape), timesteps=args.steps_b,
                                          guidance=args.guidance_b, generator=torch.Generator().manual_seed(0))
        rows["2 ... with the empty caption instead of the text"] = probe.score(
            to_pil(models.stage_a.decode(sampled).clamp(0, 1)), captions)
        size = int(stage_a_latents.shape[-1]) * models.stage_a.config.downscale
        settings = dict(models=models, height=size, width=size, steps_c=args.steps_c, steps_b=args.steps_b,
                        guidance_c=args.guidance_c, guidance_b=args.guidance_b, batch_size=16)
        chain = generate.generate_images(captions, n=1, **settings)
        rows["3 C -> B -> A from training captions"] = probe.score(chain.images, chain.prompts)
        unseen = probe.unseen_prompts(training_captions(latents), args.unseen, seed=0)
        chain = generate.generate_images(unseen, n=4, **settings)
        rows["3 C -> B -> A from unseen prompts (x4)"] = probe.score(chain.images, chain.prompts)
    attributes = probe.ATTRIBUTES
    print(f"{'link':<50}{'n':>4}" + "".join(f"{a:>11}" for a in attributes) + f"{'no object':>11}")
    for name, result in rows.items():
        print(f"{name:<50}{result['n_images']:>4}" + "".join(f"{result['accuracy'][a]:11.2f}" for a in attributes)
              + f"{result['no_object']:>11}")
    print(f"{'chance':<54}" + "".join(f"{probe.CHANCE[a]:11.2f}" for a in attributes))


def text_use(models, batch, keep, captions, b_run: str) -> None:
    """Does Stage B read its text? Attention share of the colour token, eps differences, gradient norms."""
    from stages import diffusion
    from stages.blocks import AttnBlock

    stage_b = models.stage_b
    x0, effnet = batch["stage_a"][keep].float(), batch["semantic"][keep].float()
    text = models.text_b.encode(captions)
    uncond = models.text_b.empty_embedding().expand_as(text)
    # The colour word's position: the first token where captions differing only in their colour differ.
    from pipelines.evaluation import probe

    colours = [probe.caption("large", c, "circle", "centre", "grey") for c in probe.PALETTES["colour"][:2]]
    with torch.no_grad():
        pair = models.text_b.encode(colours)
    colour_token = int(((pair[0] - pair[1]).abs().sum(-1) > 1e-6).nonzero()[0])
    shares = []

    def hook(module, inputs, _output):
        tokens, kv = inputs
        heads, width = module.nhead, tokens.shape[-1]
        q = module.to_q(tokens).unflatten(-1, (heads, width // heads)).transpose(1, 2)
        k = module.to_k(kv).unflatten(-1, (heads, width // heads)).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(-1)
        first_text = kv.shape[1] - text.shape[1]
        shares.append((float(weights[..., first_text:].sum(-1).mean()), float(weights[..., first_text + colour_token].mean()),
                       1.0 / kv.shape[1]))

    handles = [m.attention.register_forward_hook(hook) for m in stage_b.modules() if isinstance(m, AttnBlock)]
    print(f"Stage B's text use ({len(captions)} training samples; colour word = text token {colour_token})")
    try:
        for t_value in (0.5, 0.9, 0.99):
            shares.clear()
            t = torch.full((len(x0),), t_value)
            x_t = diffusion.add_noise(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
            with torch.no_grad():
                eps = stage_b(x_t, t, effnet, text)
                no_text = (eps - stage_b(x_t, t, effnet, uncond)).abs().mean()
                no_latent = (eps - stage_b(x_t, t, torch.zeros_like(effnet), text)).abs().mean()
            blocks = ", ".join(f"{a:.2f}/{c:.4f}" for a, c, _ in shares[:len(handles)])
            print(f"  t={t_value}: attention on text/colour token per block {blocks} (uniform per key "
                  f"{shares[0][2]:.4f}); |eps - eps(empty caption)| {no_text:.4f}, |eps - eps(no latent)| {no_latent:.4f}")
    finally:
        for handle in handles:
            handle.remove()
    was_training = stage_b.training
    stage_b.train()
    stage_b.zero_grad()
    loss, _ = diffusion.stage_b_loss(stage_b, x0, effnet, text, generator=torch.Generator().manual_seed(0),
                                     timestep_warp=json.load(open(os.path.join(b_run, "run.json"))).get("config", {})
                                     .get("data", {}).get("timestep_warp", 1.0))
    loss.backward()

    def norm(match) -> float:
        grads = [p.grad.norm() ** 2 for n, p in stage_b.named_parameters() if match(n) and p.grad is not None]
        return float(sum(grads) ** 0.5) if grads else 0.0

    print(f"  grad norm (Stage B loss {loss.item():.3f}): clip_mapper {norm(lambda n: n.startswith('clip_mapper')):.5f}, "
          f"attention {norm(lambda n: '.attention.' in n or 'kv_mapper' in n):.5f}, "
          f"effnet_mappers {norm(lambda n: n.startswith('effnet_mappers')):.5f}, all {norm(lambda n: True):.5f}")
    stage_b.zero_grad(set_to_none=True)
    stage_b.train(was_training)


if __name__ == "__main__":
    main()

"""The `wurst` command: `wurst <phase> [args]`, `wurst workflow`, `wurst demo`, `wurst cluster ...`.

Thin over the entry points that `python -m pipelines.<phase>` and `ray job submit` run: the same
flags, the same output and the same exit codes (0 done, 2 a bad config value, 1 an unusable input).
"""

from __future__ import annotations

import importlib
import sys

from pipelines.phase import run_cli

# name -> (module, one line); static so that `wurst --help` imports nothing heavy.
COMMANDS = {
    "filter": ("pipelines.filter", "LAION metadata -> an aesthetic, safe, de-duplicated set + funnel"),
    "download": ("pipelines.download", "image shards with img2dataset (address guard, counted failures)"),
    "dedup_images": ("pipelines.dedup_images", "which downloaded images are copies of others (precompute's exclude)"),
    "encoders": ("pipelines.encoders", "the frozen text encoder and Semantic Compressor as checkpoints"),
    "precompute": ("pipelines.precompute", "text embeddings and image latents, once, into shards"),
    "train": ("pipelines.train", "train Stage A, B or C with DeepSpeed under Ray Train"),
    "generate": ("pipelines.generate", "images: text -> Stage C -> Stage B -> Stage A"),
    "evaluate": ("pipelines.evaluate", "an export's images scored: attribute probe, FID, CLIP score, in MLflow"),
    "doctor": ("pipelines.doctor", "versions, accelerator and the Ray cluster, logged to MLflow"),
    "workflow": ("pipelines.workflow", "run the phases of a workflow config in order (--submit: as Ray jobs)"),
    "demo": ("pipelines.demo", "the whole workflow on the built-in dataset (= make demo)"),
    "cluster": ("cluster.__main__", "a local Ray cluster: up | status | env | down; render: deployment files"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: wurst <command> [args]   (wurst <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Each phase is also `python -m pipelines.<phase>` (what `ray job submit` runs)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"wurst: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    entry = module.PHASE.main if hasattr(module, "PHASE") else module.main
    run_cli(name, entry, rest)


if __name__ == "__main__":
    main()

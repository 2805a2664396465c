"""The trainer behind `python -m pipelines.train` (the phase module), one component a module:

* `config`: TrainConfig (the settings), RunPlan (what the driver resolves), VERSION_EXCLUDES.
* `specs`: one StageSpec per stage in STAGES: everything that differs between Stage A, B and C.
* `driver`: plan_run, run.json, the Ray Train TorchTrainer launch.
* `loop`: WorkerLoop and train_worker, the loop every worker runs, for every stage.
* `runner` (the interface), `diffusion` (Stage B / C) and `stage_a` (the VQGAN): the stage-specific half of a worker.
* `engine` (DeepSpeed set-up), `ema`, `checkpoint`, `export`, `metrics`, `data`, `preview`: the pieces.

Nothing here imports `pipelines.train`.
"""

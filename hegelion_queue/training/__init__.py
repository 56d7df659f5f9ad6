"""Training and judging adapters: LoRA fine-tuning with mlx-lm under the Shannon Control Unit, with no Redis.

`convert` renders samples in the trainer's format; `train` runs `mlx_lm.tuner.train` with what `hooks` injects (the
SCU loss and callback) and `args` configures; `scu` is the controller's maths (no MLX); `evaluate` measures held-out
cross-entropy and format adherence, `intervals` their uncertainty, `eval_summary` the one line `status` shows;
`ablate` compares arms over seeds; `eta` times steps; `blas` and `backend` choose the BLAS and the MLX build. Imports
core only; nothing here imports MLX at module level but `train`, `hooks`, `lm` and `evaluate`.
"""

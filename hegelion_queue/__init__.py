"""hegelion-queue: prompt dataset -> dialectical training data (arq + Redis) -> LoRA adapter (mlx-lm + SCU)."""

__version__ = "0.1.0"

"""`hegelion-queue`: enqueue prompts, run workers, watch and export runs, train adapters — the top layer.

Each module holds one group of commands (`runs`, `export`, `training`, `local`; `common` what they share);
importing them registers them on `app`, in the order `--help` lists them.
"""

from . import runs, export, training, local  # noqa: F401,I001  (registers the commands, in this order)
from .common import app, main

__all__ = ["app", "main"]

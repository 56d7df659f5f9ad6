"""`hegelion-queue`: enqueue prompts, run workers, watch and export runs, train adapters.

Each module holds one group of commands; importing them registers them on `app`, in the order `--help` lists them.
"""

from . import runs, export, training, local  # noqa: F401,I001  (registers the commands, in this order)
from .common import app, main

__all__ = ["app", "main"]

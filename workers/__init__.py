"""arq WorkerSettings only: `arq workers.generator.WorkerSettings`, `arq workers.trainer.WorkerSettings`."""

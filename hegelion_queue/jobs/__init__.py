"""The orchestrators, above the pieces they call: `producer` enqueues a run's prompts (and purges, resumes, retries),
`generate` is the generator job (one prompt -> one committed sample or one dead letter), `training_job` the trainer
worker's job. arq's `WorkerSettings` in `workers/` point at these. Imports every layer below.
"""

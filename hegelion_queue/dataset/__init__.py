"""What is made of a run's samples: `provenance` (the configuration and commands that made it, the teacher's id),
`quality` (duplicates, refusals, languages), `decontaminate` (13-gram overlap with benchmarks), `exports` (scu and
dpo files) and `hfdataset` (the Hugging Face folder and its card). Imports the layers below: queue, teacher,
sources, training, core.
"""

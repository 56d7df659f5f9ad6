"""Where prompts come from: `read` opens a Hub dataset, a hub-layout folder or a local file a batch at a time and
picks its prompt column (and defines a prompt's id); `sample` drops unusable and near-duplicate rows and draws a
seeded sample without holding the dataset in memory. Imports core only.
"""

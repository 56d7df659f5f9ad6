"""Everything that lives in Redis: reaching it (`connection`), packing values small (`codec`), the Lua scripts that
keep a run's state exactly once (`scripts`, `store`), the run's JSONL copy (`jsonl`), budgets and cost (`budget`,
`cost`), the shared rate limit (`ratelimit`), worker heartbeats and pickup (`heartbeat`, `pickup`), local Redis and
worker processes (`runner`), and where a run stands (`status`). Imports core, training (the eval's summary line) and
teacher (the process runner).
"""

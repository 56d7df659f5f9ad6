"""Operating the fleet: `dashboard` (the web app), `metrics` (the Prometheus collector), `estimate` (what a run
would cost) and `demo` (the offline pipeline of `make demo`). Imports every layer below; only `cli` sits above.
"""

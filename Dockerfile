# hegelion-queue worker image: the project (optionally with its train extra) and kimi-cli as a separate tool.
FROM python:3.13-slim

ARG WITH_TRAIN=0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends util-linux redis-tools \
    && rm -rf /var/lib/apt/lists/*

# kimi-cli 1.51.0 is the last release with a working `kimi` (1.52.0 is a stub); it gets its own venv.
RUN python -m venv /opt/kimi && /opt/kimi/bin/pip install "kimi-cli==1.51.0" \
    && ln -s /opt/kimi/bin/kimi /usr/local/bin/kimi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hegelion_queue ./hegelion_queue
COPY workers ./workers
RUN if [ "$WITH_TRAIN" = "1" ]; then pip install ".[train]"; else pip install .; fi

VOLUME ["/app/artifacts"]
CMD ["arq", "workers.generator.WorkerSettings"]

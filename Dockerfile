# syntax=docker/dockerfile:1
# The ragcache API: a slim, non-root image. Postgres and Redis are separate services
# (see docker-compose.yml), so only the `local` extra (CPU embeddings) is installed,
# not the embedded servers.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch is pinned as in pyproject.toml ([local] extra). Install the CPU-only build first:
# the default wheel for Linux pulls several GB of CUDA libraries the service never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY ingest ./ingest
RUN pip install ".[local]"


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAG_HOST=0.0.0.0 \
    RAG_PORT=8000

RUN groupadd --system --gid 10001 ragcache \
 && useradd --system --uid 10001 --gid ragcache --create-home --home-dir /home/ragcache ragcache

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# The demo corpus, for `docker compose exec api rag-ingest add examples --source handbook`.
COPY --chown=ragcache:ragcache examples ./examples

USER ragcache
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# DATABASE_URL and REDIS_URL must be set: the embedded servers are not in this image.
CMD ["rag-serve", "--host", "0.0.0.0", "--workers", "2"]

# syntax=docker/dockerfile:1
# The ragcache API: a slim, non-root image. Postgres and Redis are separate services
# (see docker-compose.yml), so only the `local` extra (CPU embeddings) is installed,
# not the embedded servers (DATABASE_URL and REDIS_URL must be set).
#
#   docker build -t ragcache .
#
# The base image is pinned to a patch release (both stages); bump it deliberately, and
# rebuild, for Python and Debian security fixes.

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch is pinned in pyproject.toml ([local] extra: torch==2.13.0). The PyTorch CPU index
# offers 2.13.0+cpu, which satisfies the pin and wins over PyPI's default Linux wheel,
# which would pull several GB of CUDA libraries the service never uses. The check after
# the install fails the build if any CUDA library slipped in anyway.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /src
# Dependencies first, from pyproject.toml alone (empty stubs for the packages and the
# readme), so that editing code or docs does not reinstall torch: this layer is rebuilt
# only when pyproject.toml changes.
COPY pyproject.toml ./
RUN mkdir service ingest && touch README.md service/__init__.py ingest/__init__.py \
 && pip install --extra-index-url "$TORCH_INDEX_URL" ".[local]" \
 && if pip list --format=freeze | grep -qi '^nvidia-'; then \
      echo "CUDA libraries were installed; torch must come from $TORCH_INDEX_URL" >&2; exit 1; \
    fi \
 && rm -rf README.md service ingest build *.egg-info

# Then the project itself, without touching the dependencies installed above. (The stub's
# build/ is gone: setuptools would otherwise keep its newer, empty __init__.py files.)
COPY README.md ./
COPY service ./service
COPY ingest ./ingest
RUN pip install --no-deps --force-reinstall . \
 && python -c "import service.http.app, ingest.cli, torch; print('torch', torch.__version__)"


FROM python:3.11.14-slim-bookworm

# RAG_DATA_DIR: rag-serve --workers N keeps prometheus-client's multiprocess files in
# RAG_DATA_DIR/prometheus (cleared at every start), so it must be writable by the user.
# OMP_NUM_THREADS is left unset: torch then uses every core in each worker; see
# docs/operations.md ("Scaling out") for sizing it against --workers.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAG_HOST=0.0.0.0 \
    RAG_PORT=8000 \
    RAG_DATA_DIR=/var/lib/ragcache

RUN groupadd --system --gid 10001 ragcache \
 && useradd --system --uid 10001 --gid ragcache --create-home --home-dir /home/ragcache ragcache \
 && install -d -o ragcache -g ragcache -m 0750 /var/lib/ragcache

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# The demo corpus, for `docker compose exec api rag-ingest add examples --source handbook`.
COPY --chown=ragcache:ragcache examples ./examples

USER ragcache:ragcache
EXPOSE 8000

# Liveness only (/health answers whenever the process does); /ready is for load balancers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["rag-serve", "--host", "0.0.0.0", "--workers", "2"]

# One image for the three services (and the one-shot artifact preparation).
FROM python:3.11-slim

# CPU torch by default; a CUDA build for the gateway/user_service on a GPU host:
#   docker compose build --build-arg TORCH_SPEC=torch==2.13.0 --build-arg PIP_EXTRA_INDEX_URL=<cuda index>
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml constraints.txt ./
COPY protos ./protos
COPY shared ./shared
COPY user_service ./user_service
COPY candidate_service ./candidate_service
COPY retrieval_gateway ./retrieval_gateway
COPY training ./training
COPY twotower_cli ./twotower_cli
# Protos first, then the editable install, so that the console scripts (`twotower health` in every compose
# health check) import the generated code from any directory; tests/unit/test_compose.py runs this script.
COPY docker/install.sh ./docker/install.sh
RUN sh docker/install.sh

# Non-root at run time; artifacts (model, corpus, caches) live on a volume.
RUN useradd --create-home --uid 10001 app && mkdir -p /artifacts && chown app:app /artifacts
USER app
VOLUME ["/artifacts"]

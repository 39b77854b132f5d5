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
RUN pip install -c constraints.txt -e ".[dev]" \
    && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/twotower/v1/*.proto \
    && touch twotower/__init__.py twotower/v1/__init__.py

# Non-root at run time; artifacts (model, corpus, caches) live on a volume.
RUN useradd --create-home --uid 10001 app && mkdir -p /artifacts && chown app:app /artifacts
USER app
VOLUME ["/artifacts"]

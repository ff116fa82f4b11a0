# micrograd-rpc container: build the wheels (the project's, with the native kernel,
# and every dependency's) in one stage, install them offline on a slim image in the next.
#   docker build -t micrograd-rpc .          (or: podman build --format docker ...,
#                                             which keeps the HEALTHCHECK)
# The build stage uses the full Python image, which has a C compiler.
FROM python:3.11 AS build
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when that file
# changes, not when the sources do.
# pip's download cache is kept between builds (BuildKit and buildah cache mounts).
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
    && pip wheel --wheel-dir /wheels -r requirements.txt
COPY setup.py README.md ./
COPY engine engine
COPY codec codec
COPY server server
COPY client client
COPY proto proto
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --find-links /wheels --wheel-dir /wheels .

FROM python:3.11-slim
# The package's version (micrograd.__version__, checked by tests/test_docs.py).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="micrograd-rpc" org.opencontainers.image.version="${VERSION}"
RUN useradd --create-home --uid 10001 micrograd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl && rm -rf /wheels
USER 10001
# gRPC and JSON-RPC/HTTP ports. Inside the container the server listens on every
# interface, so it refuses to start without TLS or a token (--tls-cert/--tls-key,
# --auth-token-file) unless told --insecure; see docs/DEPLOY.md.
EXPOSE 50051 8080
ENV MICROGRAD_RPC_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
# grpc.health.v1 (open without a token). For a server that serves TLS, give the check its
# CA (and a client certificate under mutual TLS) by MICROGRAD_RPC_TLS_CA,
# MICROGRAD_RPC_TLS_CLIENT_CERT and MICROGRAD_RPC_TLS_CLIENT_KEY, or override it as
# docker-compose.yml does.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["micrograd-rpc", "health", "--target", "127.0.0.1:50051", "--timeout", "2"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["micrograd-rpc"]
CMD ["serve"]

# micrograd-rpc container: build the wheel (with the native kernel) in one stage,
# run it on a slim image in the next.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY engine engine
COPY codec codec
COPY server server
COPY client client
COPY proto proto
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# The package's version (micrograd.__version__, checked by tests/test_docs.py).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="micrograd-rpc" org.opencontainers.image.version="${VERSION}"
RUN useradd --create-home --uid 10001 micrograd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER micrograd
# gRPC and JSON-RPC/HTTP ports; bind all interfaces inside the container.
EXPOSE 50051 8080
ENV MICROGRAD_RPC_HOST=0.0.0.0
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
ENTRYPOINT ["micrograd-rpc"]
CMD ["serve"]

# token-broker: a sidecar that keeps OAuth 2.0 access tokens fresh.
# Build: docker build -t token-broker:0.1.0 .
# Runs as UID 65532 with a read-only root filesystem (mount an emptyDir at /tmp).

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/token-broker
COPY pyproject.toml README.md ./
COPY broker ./broker
# Dependencies come from the project's metadata (pyproject.toml). The `fast` extra adds uvloop,
# which `serve` then uses (TOKEN_BROKER_EVENT_LOOP=asyncio turns it off): about a quarter less
# CPU per token request than asyncio's loop (bench/api_bench.py).
RUN /opt/token-broker/bin/pip install --no-cache-dir '.[fast]'

FROM python:3.11.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="Keeps OAuth 2.0 access tokens fresh and serves them over localhost" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/token-broker"
COPY --from=build /opt/token-broker /opt/token-broker
ENV PATH="/opt/token-broker/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 9411
ENTRYPOINT ["token-broker"]
CMD ["serve", "--config", "/etc/token-broker/config.yaml"]

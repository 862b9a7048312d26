# token-broker: a sidecar that keeps OAuth 2.0 access tokens fresh.
# Build (reproducible: same sources and lock, same image bytes):
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" \
#     --output type=image,name=token-broker:0.1.0,rewrite-timestamp=true .
# SBOM of what it installs: scripts/sbom (CycloneDX, from requirements/runtime.txt).
# Runs as UID 65532 with a read-only root filesystem (mount an emptyDir at /tmp).

# The base is pinned by digest (the multi-arch index of the 3.11.11 slim-bookworm tag), so a
# re-pushed tag cannot change the image. Bump tag and digest together.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE} AS build
ARG SOURCE_DATE_EPOCH=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
WORKDIR /src
# Every package comes from the hash-pinned lock (requirements/runtime.txt: the runtime
# dependencies and uvloop, the `fast` extra, which `serve` then uses; TOKEN_BROKER_EVENT_LOOP=
# asyncio turns it off). --require-hashes refuses any file whose hash differs from the lock, and
# --only-binary refuses to build anything from source. The build tools (pip, setuptools, wheel)
# come from requirements/build.txt, also hashed, and build the broker's own wheel without
# fetching anything (--no-build-isolation).
COPY requirements/build.txt requirements/runtime.txt ./requirements/
RUN python -m venv /opt/build \
    && /opt/build/bin/python -m pip install --no-cache-dir --require-hashes --no-deps \
        -r requirements/build.txt \
    && python -m venv --without-pip /opt/token-broker \
    && /opt/build/bin/python -m pip --python /opt/token-broker/bin/python install --no-cache-dir \
        --require-hashes --no-deps --only-binary :all: --no-compile -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY broker ./broker
# The broker's wheel (its zip entries dated SOURCE_DATE_EPOCH), installed without dependencies:
# the lock already put them there. The runtime venv has no pip or setuptools of its own: the
# build venv's pip installs into it (--python). Bytecode is compiled once with hash-based invalidation, so
# the .pyc files do not depend on file times.
RUN /opt/build/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
        -w /wheels . \
    && /opt/build/bin/python -m pip --python /opt/token-broker/bin/python install --no-cache-dir \
        --no-deps --no-compile /wheels/token_broker-*.whl \
    && /opt/token-broker/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        /opt/token-broker/lib

FROM ${PYTHON_IMAGE}
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

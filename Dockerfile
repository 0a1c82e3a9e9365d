# pgproxy's image: the mypyc-compiled build on a slim Python, run as a fixed non-root UID that
# needs no writable root filesystem. README.md "Deploying" documents it; scripts/test-image
# builds and drives it.
#
#   docker build -t pgproxy .
#   docker run --rm -p 6432:6432 -e DATABASE_URL=postgresql://db.internal:5432 pgproxy
#
# Configuration: a file mounted at /etc/pgproxy/pgproxy.toml is found on its own (the image's
# own is empty), DATABASE_URL / DATABASE_URLS / PGPROXY_<SETTING> override it
# (`pgproxy --env-table`), and the file is reloaded when it changes.

# Any Debian-based image with python3 (>= 3.11) and its venv module; scripts/test-image passes
# a base made locally with debootstrap.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: the compiled wheel
FROM ${BASE_IMAGE} AS build
# mypyc needs a C compiler and the Python headers (the official python images ship the
# headers; Debian's python3 has them in python3-dev).
RUN set -eux; \
    headers=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
    dev=; [ -f "$headers/Python.h" ] || dev=python3-dev; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev $dev; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# pip trusts the system's CA store (behind a TLS-inspecting proxy that is the one that works).
# The wheels of pgproxy and of its dependencies go to /wheels, then into the venv the runtime
# stage copies: the runtime image gets no compiler, no pip cache and no network access.
RUN set -eux; \
    [ ! -f /etc/ssl/certs/ca-certificates.crt ] || export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    python3 -m venv /tmp/build-venv; \
    PGPROXY_COMPILE=1 /tmp/build-venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels .; \
    python3 -m venv /opt/pgproxy; \
    cd /; \
    /opt/pgproxy/bin/pip install --no-cache-dir --no-index --find-links /wheels pgproxy; \
    /opt/pgproxy/bin/pip uninstall -y -q pip setuptools || true; \
    /opt/pgproxy/bin/python -c 'import sys, pgproxy; sys.exit(not pgproxy.compiled())'

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
COPY --from=build /opt/pgproxy /opt/pgproxy
COPY deploy/image/pgproxy.toml /etc/pgproxy/pgproxy.toml
# A fixed numeric UID (Kubernetes' runAsNonRoot checks the number), named for ps and logs.
RUN echo 'pgproxy:x:10001:10001:pgproxy:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'pgproxy:x:10001:' >> /etc/group
ENV PATH=/opt/pgproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PGPROXY_CONFIG=/etc/pgproxy/pgproxy.toml \
    PGPROXY_LISTEN_HOST=0.0.0.0
USER 10001:10001
# Clients; the HTTP health/metrics listener when PGPROXY_METRICS_LISTEN=0.0.0.0:9127.
EXPOSE 6432 9127
# SIGTERM is pgproxy's drain (each client closed at a transaction boundary), then exit 0.
STOPSIGNAL SIGTERM
# GET /healthz when metrics_listen is set, else a TCP connect to the client port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "pgproxy.healthcheck"]
ENTRYPOINT ["pgproxy"]

# syntax=docker/dockerfile:1
#
# The delayed-events sidecar. Build:   docker build -t delayed-events-sidecar .
# Schema (run once per release, before serving; it needs the database URL only):
#   docker run --rm -e SIDECAR_DATABASE_URL=... delayed-events-sidecar migrate
# Serve:  docker run -p 127.0.0.1:8009:8009 -e ... delayed-events-sidecar
# A key:  docker run --rm delayed-events-sidecar gen-key
# docs/deploy.md has the whole guide.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the dependencies, in a self-contained virtualenv ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/sidecar
WORKDIR /src
# The dependency list alone first, so that a change to the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/sidecar/bin/pip install -r requirements.txt
# The package: the code and its migrations, built as a wheel and installed into the virtualenv.
# `python -m app migrate` finds the migrations inside the installed package; no source tree is
# needed at run time (tests/integration/test_image_build.py replays these steps).
COPY README.md ./
COPY app ./app
COPY migrations ./migrations
RUN /opt/sidecar/bin/pip wheel --no-deps --wheel-dir /tmp/wheel . \
 && /opt/sidecar/bin/pip install --no-deps /tmp/wheel/*.whl

# --- runtime: the virtualenv alone, an unprivileged user; no compilers, no pip cache ---
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_LISTEN_HOST=0.0.0.0 \
    SIDECAR_LISTEN_PORT=8009
RUN groupadd --system --gid 10009 sidecar \
 && useradd --system --uid 10009 --gid sidecar --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
WORKDIR /opt/sidecar
USER sidecar:sidecar
EXPOSE 8009
# /health answers 200 while the process is alive; readiness (database, scheduler) is /ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SIDECAR_LISTEN_PORT', '8009'), timeout=4)" || exit 1
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve"]

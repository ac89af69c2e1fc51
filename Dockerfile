# syntax=docker/dockerfile:1
# One image for every wisp service: the command picks it (`python -m services.<name>`; compose.yaml
# and k8s/ set it per container). CPU by default; the CUDA variant is the same image with a CUDA
# torch build (its wheels bundle the CUDA runtime; the host needs only the NVIDIA driver and
# container toolkit):
#   docker build -t wisp:0.1.0 .
#   docker build -t wisp:0.1.0-cuda \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
# PYTHON_IMAGE swaps the base (any Debian-based image with Python >= 3.11 at `python`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index: the largest layer, rebuilt only when TORCH_SPEC changes.
RUN pip install ${TORCH_SPEC}
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common common
COPY services services
COPY loadgen loadgen
# Editable, so the code stays at /app and finds the shipped models beside it (/app/models).
RUN pip install -e . && python -m compileall -q common services loadgen

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 wisp \
    && useradd --system --uid 10001 --gid wisp --create-home --home-dir /home/wisp wisp \
    && mkdir -p /models /var/lib/wisp/results \
    && chown -R wisp:wisp /models /var/lib/wisp
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
# The tiny draft/target pair and the predictor (the defaults of every service).
COPY models /app/models
# Services listen on all interfaces inside a container (loopback is the default outside one);
# every service but metrics (9100) serves /healthz, /readyz and /metrics on 8080.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/wisp \
    WISP_HTTP_HOST=0.0.0.0 \
    WISP_HTTP_PORT=8080
# Real models (Hugging Face folders) are mounted here: WISP_TARGET_MODEL=/models/<folder>.
VOLUME ["/models"]
# Writable working directory: the verifier's latency estimator (.wisp/estimator), loadgen results.
WORKDIR /var/lib/wisp
USER 10001:10001
EXPOSE 8080 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ['WISP_HTTP_PORT'], timeout=4)"]
CMD ["python", "-m", "services.cli", "--help"]

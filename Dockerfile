# One image for the operator and the relay; the workload picks the command:
#   operator: python -m mailrelay.operator
#   relay:    python -m mailrelay.relay --config /etc/mailrelay/relay.yaml
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY relay/ relay/
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mailrelay" \
      org.opencontainers.image.description="Kubernetes operator and SMTP relay for managed mail relays" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The relay's spool is a mounted volume; nothing else is written at run time.
WORKDIR /var/lib/mailrelay
USER 65532:65532
EXPOSE 587 465 9090
CMD ["python", "-m", "mailrelay.operator"]

# One image for the operator and the relay; the workload picks the command:
#   operator: python -m mailrelay.operator
#   relay:    python -m mailrelay.relay --config /etc/mailrelay/relay.yaml
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The two shipped packages (the workspace's support package is for tests and dev tools).
COPY relay/ relay/
COPY operator/ operator/
# --use-pep517: dependencies published only as sdists (dkimpy) build in an isolated env
# with current setuptools, not with setup.py in this stage (which has no `wheel`).
RUN pip wheel --use-pep517 --wheel-dir /wheels ./relay ./operator

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
# A passwd and group entry for the runtime user: Python's getpass (kopf's peering identity
# outside a pod) and other tools look the uid up and fail without one.
RUN echo 'mailrelay:x:65532:65532:mailrelay:/var/lib/mailrelay:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'mailrelay:x:65532:' >> /etc/group
# The relay's spool is a mounted volume; nothing else is written at run time.
WORKDIR /var/lib/mailrelay
USER 65532:65532
EXPOSE 587 465 9090
CMD ["python", "-m", "mailrelay.operator"]

# Prometheus from Debian's package, for hosts that cannot pull prom/prometheus (docs/deploy.md, "Compose with
# podman"); deploy/docker-compose.local.yml builds it. Same layout as the official image: config at
# /etc/prometheus/prometheus.yml (mounted by compose), data in /prometheus, not root.
ARG BASE_IMAGE=debian:12.8-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# netwatch site daemon. ICMP probes need raw sockets: run with `--cap-add NET_RAW`
# (or set `privileged: "no"` plus `fallback_tcp_port` on icmp targets).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY netwatch ./netwatch
COPY probes ./probes
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/netwatch --create-home netwatch
COPY --from=build /install /usr/local
COPY config/netwatch.minimal.yaml /etc/netwatch/netwatch.yaml
USER netwatch
WORKDIR /var/lib/netwatch
EXPOSE 9108 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["netwatch"]
CMD ["run", "-c", "/etc/netwatch/netwatch.yaml"]

# netwatch site daemon, running as the non-root user `netwatch`.
#
# ICMP: `--cap-add NET_RAW` gives nothing to a non-root process (Docker sets no ambient
# capabilities), so icmp targets use unprivileged ICMP sockets instead (`privileged: auto`
# picks them). Those need the container's net.ipv4.ping_group_range to cover the user's
# group: Docker 20.10 and later set "0 2147483647" in every container; elsewhere add
# `--sysctl net.ipv4.ping_group_range="0 2147483647"` (docker-compose.yml does). Raw
# sockets (`privileged: yes`) need `--user root --cap-add NET_RAW`. Without either, set
# `fallback_tcp_port` on icmp targets.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
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

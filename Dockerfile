# NetSel in a container: a build stage with the Rust toolchain, then a small runtime
# image running as an unprivileged user.
#
#   docker build -t netsel .
#   docker run --rm -p 9000:9000 -p 9001:9001 -p 5353:5353/udp -p 5353:5353 \
#       -p 8080:8080 -p 8081:8081 -v netsel-data:/var/lib/netsel netsel
#
# Cluster mode needs the `etcd` feature (and protoc to build it):
#   docker build --build-arg FEATURES=etcd -t netsel .
#
# Inside a container the API and DNS listen on 0.0.0.0 so that published ports reach them;
# turn ACLs on ([acl] in a config file, mounted and passed with --config) before
# exposing them beyond a trusted network. VIPs (127.77.0.0/16) work inside the container's
# network namespace; other hosts reach services through the proxies' published ports.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
ARG FEATURES=""
RUN if [ -n "$FEATURES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features "$FEATURES" \
    && strip target/release/netsel \
    && install -D -m 0755 target/release/netsel /out/netsel

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/netsel --create-home \
      --shell /usr/sbin/nologin netsel
COPY --from=build /out/netsel /usr/local/bin/netsel
USER netsel:netsel
WORKDIR /var/lib/netsel
VOLUME ["/var/lib/netsel"]
# registry, API/UI/metrics, DNS (UDP and TCP), TCP proxy gateway, HTTP proxy
EXPOSE 9000 9001 5353/udp 5353/tcp 8080 8081
STOPSIGNAL SIGTERM
# Orchestrators probe GET /v1/health/ready (503 while starting, draining or when the store
# cannot take writes) and /v1/health/live on the API port; both are open with ACLs on.
ENTRYPOINT ["netsel"]
CMD ["serve", "--data-dir", "/var/lib/netsel", "--api-addr", "0.0.0.0:9001", "--dns-addr", "0.0.0.0:5353"]

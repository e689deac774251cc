# keygate container image. Build:  docker build -t keygate .
# Run:    docker run -p 8080:8080 -p 9090:9090 -v "$PWD/conf:/etc/keygate:ro" --stop-timeout 40 keygate
# See deploy/README.md for the config folder layout, key updates and hot reload.

# ---------------------------------------------------------------------------------------------
# Build stage: the official Rust image on Debian bookworm, so the binary links against the same
# glibc as the runtime stage below. keygate needs no system libraries (TLS is rustls, not
# OpenSSL); the image's gcc is enough for the few crates that compile C or assembly. Pin a
# version (e.g. rust:1.95-slim-bookworm) for reproducible builds; the crate uses edition 2024,
# so it needs Rust 1.85 or newer.
FROM rust:1-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. Cargo needs a target to build, so a dummy
# main.rs and lib.rs stand in for the sources. benches/ is copied because Cargo.toml declares
# [[bench]] targets and cargo refuses a manifest whose declared targets are missing (they are
# not compiled by `cargo build`). If a build.rs is ever added, copy it here too.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources, built with exactly CI's build command. COPY keeps the files' original
# modification times, which are older than the dummy build's; the touch makes cargo see that
# the crate changed, otherwise it would keep the dummy binary.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked

# ---------------------------------------------------------------------------------------------
# Runtime stage: a small Debian with the same glibc as the build stage.
FROM debian:bookworm-slim

# ca-certificates: the system root store (/etc/ssl/certs), against which https:// upstreams are
# verified. Nothing else: keygate is one binary linked only to glibc. Versions are not pinned
# so that a rebuild picks up bookworm's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed, numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# a fixed uid lets hosts and volumes grant it access (fsGroup, chown 10001). No home, no login.
# /etc/keygate is where the config folder is mounted (keygate.toml, and the key file it names).
RUN groupadd --system --gid 10001 keygate \
 && useradd --system --uid 10001 --gid keygate --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin keygate \
 && mkdir -p /etc/keygate

COPY --from=build /src/target/release/keygate /usr/local/bin/keygate

# Every keygate command reads this when no -c is given, so `docker run IMAGE check` and
# `docker run IMAGE keys list` use the mounted config too. Logs go to stderr; set
# KEYGATE_LOG_FORMAT=json for one JSON object per line, RUST_LOG to change the level.
ENV KEYGATE_CONFIG=/etc/keygate/keygate.toml \
    RUST_LOG=info

USER 10001:10001

# 8080: the gateway ([server] listen). 9090: the admin listener ([admin] listen: /healthz,
# /readyz, /metrics, /status). Both must listen on 0.0.0.0 in the config to be reachable from
# outside the container; the admin port need not be published to the world.
EXPOSE 8080 9090

# SIGTERM makes keygate stop accepting, turn /readyz to 503, let in-flight requests finish for
# up to [server] shutdown_timeout (default 30s) and exit 0. `docker stop` waits only 10 s
# before SIGKILL by default: run with --stop-timeout (or compose stop_grace_period) above
# shutdown_timeout. keygate runs as PID 1 and handles signals itself; it starts no children,
# so no init process is needed.
STOPSIGNAL SIGTERM

# Liveness through the admin listener's GET /healthz on 127.0.0.1:9090 (this works whether the
# config says 127.0.0.1:9090 or 0.0.0.0:9090). keygate has no HTTP-client subcommand and the
# slim image has no curl or wget. Installing curl would add libcurl and a dozen libraries
# (TLS, LDAP, SSH, Kerberos) to the image only for a loopback GET. Bash is already there
# (Debian's essential set) and can open a TCP socket through /dev/tcp, so the check writes one
# HTTP/1.1 request and accepts a "200" in the status line. A config without [admin] or with
# another admin port makes this fail: change it with `docker run --health-cmd …` or
# `--no-healthcheck`. start-period covers the load of a large key file.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["keygate"]
CMD ["serve"]

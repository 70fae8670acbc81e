# syntax=docker/dockerfile:1
#
# Build:  docker build -t switchyard .
# Run:    docker run --rm -p 8080:8080 \
#           -v "$PWD/switchyard.toml:/etc/switchyard/switchyard.toml:ro" switchyard
#
# Listeners in the mounted file must bind 0.0.0.0 (or ::), not 127.0.0.1, to be reachable
# from outside the container.

# The build stage: the official Rust image, with the C compiler that the TLS and compression
# crates need.
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The manifest, the lock file and the sources (.dockerignore keeps tests, history and build
# output out of the context).
COPY . .
# The registry and target caches persist between builds, so a change to the source rebuilds
# the crate alone. The binary is copied out of the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/switchyard /usr/local/bin/switchyard

# The runtime stage: the same Debian release as the build stage (same glibc), slim, no
# toolchain, no shell tools beyond the base.
FROM debian:bookworm-slim
# CA certificates, for pools that name the system bundle as their CA.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid switchyard --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
# A numeric user, so that orchestrators can check it is not root without reading /etc/passwd.
USER 10001:10001
# SIGTERM starts the graceful drain; give `docker stop` a --time longer than drain_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run", "--config", "/etc/switchyard/switchyard.toml"]

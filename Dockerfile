# syntax=docker/dockerfile:1
# One image for every distkv binary: distkv (node, router, playground), distkv-operator
# and distkv-loadtest. Build:   docker build -t distkv:dev .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Keep symbols for readable backtraces but not the debug info the workspace profile adds.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY . .
# Cache mounts keep the registry and incremental artefacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin distkv --bin distkv-operator --bin distkv-loadtest \
    && mkdir -p /out \
    && cp target/release/distkv target/release/distkv-operator target/release/distkv-loadtest /out/

# glibc and libgcc only: the binaries use rustls, so no OpenSSL; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="distkv" \
      org.opencontainers.image.description="Sharded, replicated key-value store: node, router, operator, load test" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
# The uid the Kubernetes manifests run as (runAsUser 10001, fsGroup 10001).
USER 10001:10001
EXPOSE 7000 8080 8081
ENTRYPOINT ["/usr/local/bin/distkv"]
CMD ["--help"]

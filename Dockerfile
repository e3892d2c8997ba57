# artifactd container image.
#
#   docker build --build-arg ARTIFACTD_GIT_SHA=$(git rev-parse --short=12 HEAD) -t artifactd .
#
# Three build stages with cargo-chef, so dependencies (the slow part) are rebuilt only when
# Cargo.toml/Cargo.lock change, not on every source edit. protoc comes from the build
# itself (protoc-bin-vendored), so no system protobuf is installed. The runtime image is
# distroless (glibc, CA certificates, no shell) and runs as an unprivileged user; health is
# for Kubernetes probes (gRPC health service, /readyz), so there is no HEALTHCHECK.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.73 --locked
WORKDIR /src

# The dependency recipe: changes only when manifests do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# There is no .git in the build context: the commit comes in as a build argument.
ARG ARTIFACTD_GIT_SHA=unknown
ENV ARTIFACTD_GIT_SHA=${ARTIFACTD_GIT_SHA}
RUN cargo build --release --locked --bin artifactd \
    && ./target/release/artifactd --version

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /src/target/release/artifactd /usr/local/bin/artifactd
# Smoke test on the runtime image itself: the binary starts with this image's libraries.
RUN ["/usr/local/bin/artifactd", "--version"]
USER 65532:65532
WORKDIR /home/nonroot
# Listen on every interface inside the pod; ARTIFACTD_AUTH=jwt is required for that (the
# server refuses to start unauthenticated on a non-loopback address).
ENV ARTIFACTD_GRPC_LISTEN=0.0.0.0:50051 \
    ARTIFACTD_HTTP_LISTEN=0.0.0.0:9090
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/artifactd"]
CMD ["serve"]

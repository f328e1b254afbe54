# syntax=docker/dockerfile:1
# The shopmesh binary in a distroless image (glibc and libgcc, no shell, no package
# manager), run as the non-root user 65532. One image for every role:
#   docker build -t shopmesh:latest .
#   docker run --rm -p 8080:8080 -p 9901:9901 shopmesh:latest up --host 0.0.0.0
#   docker run ... shopmesh:latest service catalog --host 0.0.0.0 --port 7001 --admin-port 9901
#   docker run ... shopmesh:latest gateway --config /etc/shopmesh/gateway.yaml
# deploy/kubernetes/ runs it on Kubernetes (see the README).

# The build stage is Debian 12 (bookworm) like the runtime image, so that the binary's
# glibc is the runtime's. The toolchain is the one the workspace is built and tested with.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and the target directory between builds; the
# binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p shopmesh --bin shopmesh \
    && install -D -m 0755 target/release/shopmesh /out/shopmesh \
    && install -d -m 0755 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/shopmesh /usr/local/bin/shopmesh
# The SQLite files and the embedded broker's file (`up`, and services without
# --database); on Kubernetes a volume is mounted here.
COPY --from=build --chown=65532:65532 /out/data /data
ENV SHOPMESH_DATA_DIR=/data \
    SHOPMESH_LOG_FORMAT=json
WORKDIR /data
USER 65532:65532
# 8080 the gateway, 9901 the admin and metrics port, 7001-7007 the services
# (catalog, inventory, pricing, promotions, users, orders, payments) when run alone.
EXPOSE 8080 9901 7001-7007
ENTRYPOINT ["/usr/local/bin/shopmesh"]
CMD ["up", "--host", "0.0.0.0"]

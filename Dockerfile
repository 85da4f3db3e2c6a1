# l4lb container image (kernel path included):
#   docker build -t l4lb .
# The builder runs the commands a developer's machine runs, nothing of its own:
# `cargo xtask setup --build-only` (nightly with rust-src, Debian's LLVM 22, bpf-linker)
# and `cargo xtask install` into a staging directory. tests/packaging.rs keeps it so.

# Debian 12 with rustup and the stable toolchain the project is built with.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# What xtask needs to run comes first, so that a source change does not rebuild the
# toolchain layer (bpf-linker takes minutes).
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY xtask xtask
COPY l4lb-user/Cargo.toml l4lb-user/Cargo.toml
COPY l4lb-ebpf/Cargo.toml l4lb-ebpf/Cargo.toml
RUN cargo xtask setup --build-only
COPY . .
RUN cargo xtask install --prefix /usr/local --destdir /out

# glibc and libgcc_s are all the binary links against; the eBPF object is inside it.
FROM debian:12-slim
COPY --from=build /out/usr/local/bin/l4lb /usr/local/bin/l4lb
COPY --from=build /out/etc/l4lb/l4lb.toml /etc/l4lb/l4lb.toml
COPY --from=build /out/var/lib/l4lb /var/lib/l4lb
# Root inside the container, limited to the capabilities the runtime grants (see
# deploy/compose.yaml): runtimes give a non-root user no capabilities, and
# no-new-privileges rules out file capabilities.
ENTRYPOINT ["/usr/local/bin/l4lb"]
CMD ["run", "-c", "/etc/l4lb/l4lb.toml"]

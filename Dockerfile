# syntax=docker/dockerfile:1
# The imds-agent image: build with the same toolchain recipe as development
# (`cargo xtask setup`), run from a minimal base. Build from the repository root:
#   docker build -t imds-agent:0.1.0 .

FROM rust:1.95-bookworm AS build
# Nightly with rust-src builds the kernel programs; setup adds bpf-linker built against the
# nightly's LLVM.
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask setup --no-test-tools \
 && IMDS_REQUIRE_EBPF=1 cargo build --release --locked --package imds-agent --bin imds-agent \
 && target/release/imds-agent generate-docs --out /src/target/dist

# glibc, libgcc and CA certificates (for Entra) only; the agent needs nothing else at run
# time. It runs as root with the capabilities the DaemonSet grants
# (deploy/kubernetes/imds-filter.yaml).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/imds-agent /usr/local/bin/imds-agent
# Man pages and completions, generated from the binary's own clap definitions: `man
# imds-agent-status` and tab completion for anyone who `kubectl exec`s in with a shell image.
COPY --from=build /src/target/dist/man/ /usr/local/share/man/man1/
COPY --from=build /src/target/dist/completions/imds-agent.bash /usr/share/bash-completion/completions/imds-agent
COPY --from=build /src/target/dist/completions/_imds-agent /usr/local/share/zsh/site-functions/_imds-agent
COPY --from=build /src/target/dist/completions/imds-agent.fish /usr/share/fish/vendor_completions.d/imds-agent.fish
ENTRYPOINT ["/usr/local/bin/imds-agent"]
CMD ["run", "--kube"]

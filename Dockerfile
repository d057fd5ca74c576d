# syntax=docker/dockerfile:1
# The imds-agent image. Build it with `cargo xtask image [--tag TAG]`: that builds a static
# imds-agent (glibc, crt-static; the kernel programs are built into it), stages it under
# target/image/ with its man pages, completions and a CA bundle, and builds this file with
# target/image/ as the context (podman, or docker):
#   podman build --pull=never --file Dockerfile --tag imds-agent:0.1.0 target/image
#
# FROM scratch, so the image builds with no registry and holds nothing but the agent: no
# shell, no loader, no libraries. The agent runs as root with the capabilities the DaemonSet
# grants (deploy/kubernetes/imds-filter.yaml); tests/tests/image.rs runs this image with them.
FROM scratch
COPY imds-agent /usr/local/bin/imds-agent
# Entra (workload identity, service principals) is reached over TLS.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# Man pages and completions, generated from the binary's own clap definitions: `man
# imds-agent-status` and tab completion for anyone who mounts them into a debug container.
COPY man/ /usr/local/share/man/man1/
COPY completions/imds-agent.bash /usr/share/bash-completion/completions/imds-agent
COPY completions/_imds-agent /usr/local/share/zsh/site-functions/_imds-agent
COPY completions/imds-agent.fish /usr/share/fish/vendor_completions.d/imds-agent.fish
ENTRYPOINT ["/usr/local/bin/imds-agent"]
CMD ["run", "--kube"]

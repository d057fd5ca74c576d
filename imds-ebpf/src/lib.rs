//! Host-side face of the kernel crate: empty. It exists so `imds-agent` can name this crate
//! as a build-dependency (which makes cargo rebuild the agent when the kernel code changes);
//! the programs themselves are the `imds-ebpf` binary, built for `bpfel-unknown-none`.
#![no_std]

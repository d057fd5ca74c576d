//! The IMDS filter agent as a library: the binary (`main.rs`) and the privileged tests use it.
//!
//! - [`kernel`]: load, attach and keep the eBPF programs; steer them through their maps;
//!   find out who made an accepted connection.
pub mod kernel;

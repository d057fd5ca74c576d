//! The kernel programs' own log lines (aya-log), drained into the agent's log.
use tokio::io::unix::AsyncFd;

pub async fn drain(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for as long
    // as the logger lives, i.e. as long as this AsyncFd owns it.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return tracing::warn!(error = %e, "cannot watch kernel log buffer"),
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => return tracing::warn!(error = %e, "kernel log buffer closed"),
        }
    }
}

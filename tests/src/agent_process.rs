//! The real agent binary as a process of the test ([`AgentProcess`]), and where the
//! workspace's binaries (`imds-agent`, `imds-probe`) are found.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use crate::sandbox::{unique, Cgroup, NetNs};

/// Path of the `imds-probe` binary.
pub fn probe_binary() -> PathBuf {
    built_binary("imds-probe", "IMDS_PROBE_BIN")
}

/// Path of the `imds-agent` binary built next to this test (`cargo xtask test` builds it).
#[must_use]
pub fn agent_binary() -> PathBuf {
    built_binary("imds-agent", "IMDS_AGENT_BIN")
}

/// A workspace binary: `$env_override`, else the one in this test's target directory.
fn built_binary(name: &str, env_override: &str) -> PathBuf {
    find_built_binary(name, env_override).unwrap_or_else(|e| panic!("{e}"))
}

/// The binaries a sandbox node starts ([`agent_binary`], [`probe_binary`]), or a one-line
/// error naming the first one missing and how to build it.
pub fn check_built_binaries() -> Result<(), String> {
    find_built_binary("imds-agent", "IMDS_AGENT_BIN")?;
    find_built_binary("imds-probe", "IMDS_PROBE_BIN")?;
    Ok(())
}

fn find_built_binary(name: &str, env_override: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_override) {
        return Ok(PathBuf::from(p));
    }
    // Binaries live in target/<profile>; test executables one level down, in deps/.
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(&exe);
    [dir, dir.parent().unwrap_or(dir)].iter().map(|d| d.join(name)).find(|p| p.exists()).ok_or_else(|| {
        format!(
            "{name} not found near {}: build it first (`cargo xtask demo` and `cargo xtask test` do)",
            dir.display()
        )
    })
}

/// What `imds-agent run` logs once it serves (see `imds-agent/src/agent/mod.rs`).
pub const AGENT_READY: &str = "filter installed; serving redirected connections";

/// An `imds-agent run` process (ours), `SIGKILLed` on drop if still running; its JSON log goes
/// to a file the test can read.
pub struct AgentProcess {
    child: Option<Child>,
    pub log_path: PathBuf,
    /// The decision log (the agent's stdout).
    pub decisions_path: PathBuf,
    /// Where it answers `imds-agent status` and `explain` (`--control-socket`).
    pub control_socket: PathBuf,
}

impl AgentProcess {
    /// Starts `imds-agent --log-format json run ARGS…` inside `ns` and waits until it serves.
    pub fn start(ns: &NetNs, args: &[String]) -> AgentProcess {
        AgentProcess::start_in(ns, None, args)
    }

    /// Like [`AgentProcess::start`], with the agent moved into `cgroup` and given a private
    /// cgroup namespace first — as a container runtime runs it when it is a pod.
    pub fn start_in(ns: &NetNs, cgroup: Option<&Cgroup>, args: &[String]) -> AgentProcess {
        let agent = AgentProcess::launch_in(ns, cgroup, args);
        agent.wait_for_log(AGENT_READY, Duration::from_secs(30));
        agent
    }

    /// Like [`AgentProcess::start_in`], without waiting for it to serve.
    pub fn launch_in(ns: &NetNs, cgroup: Option<&Cgroup>, args: &[String]) -> AgentProcess {
        use std::os::unix::ffi::OsStrExt as _;
        // Each agent its own control socket (unless the test names one): agents of tests
        // running side by side must not meet on the default path.
        let mut args = args.to_vec();
        let control_socket = if let Some(i) = args.iter().position(|a| a == "--control-socket") {
            PathBuf::from(&args[i + 1])
        } else {
            let socket = std::env::temp_dir().join(format!("{}.sock", unique("agent")));
            args.extend(["--control-socket".to_owned(), socket.display().to_string()]);
            socket
        };
        let ns_file = fs::File::open(ns.path()).expect("open netns");
        let procs = cgroup.map(|c| {
            std::ffi::CString::new(c.path.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL in paths")
        });
        let mut cmd = Command::new(agent_binary());
        cmd.args(["--log-format", "json", "run"]).args(&args);
        // SAFETY: between fork and exec only async-signal-safe calls run (setns, open, write,
        // close, unshare), on buffers prepared before the fork: no allocation.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 || libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        AgentProcess::launch_command(cmd, control_socket)
    }

    /// Starts `cmd`, an agent however it is run (the binary, a container), with its stdout as
    /// the decision log and its stderr as the JSON log; `control_socket` is where it answers.
    pub fn launch_command(mut cmd: Command, control_socket: PathBuf) -> AgentProcess {
        let log_path = std::env::temp_dir().join(format!("{}.log", unique("agent")));
        let decisions_path = log_path.with_extension("decisions");
        let log = fs::File::create(&log_path).expect("agent log file");
        let decisions = fs::File::create(&decisions_path).expect("agent decision log file");
        let child = cmd.stdout(decisions).stderr(log).spawn().expect("spawn the agent");
        AgentProcess { child: Some(child), log_path, decisions_path, control_socket }
    }

    /// Whether the process still runs (it has not exited, or been killed).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agent's JSON log lines so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        json_lines(&self.log_path)
    }

    /// The decision log so far; every line must be JSON.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(&self.decisions_path).expect("decision log");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("decision line {l:?}: {e}"))).collect()
    }

    /// Waits for a log line whose message is exactly `message`.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_lines().iter().any(|l| l["message"] == message) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent never logged {message:?}; log:\n{}",
                fs::read_to_string(&self.log_path).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The agent's resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as the kubelet stops a pod, and waits for the exit (`SIGKILL` after
    /// `grace`, as the kubelet does too); returns the exit status, `None` if it had to kill.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_file(&self.log_path);
        let _ = fs::remove_file(&self.decisions_path);
        let _ = fs::remove_file(&self.control_socket);
        let _ = fs::remove_file(self.control_socket.with_extension("retired"));
    }
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let f = fs::File::open(path).expect("log file");
    BufReader::new(f).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
}

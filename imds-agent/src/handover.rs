//! Upgrades that refuse nothing: an agent that starts while another serves the node takes
//! over from it, instead of waiting for it to exit.
//!
//! The serving agent listens on a Unix socket in a directory every agent pod mounts from the
//! node (`--handover-socket`). The next agent asks there once its policy has synced. Each
//! step is one line; descriptors travel with `SCM_RIGHTS`:
//!
//! 1. `take`, with the pin directory opened: only a process that reaches the node's pins
//!    (and so could change the filter anyway) may ask. The serving agent pauses its writes to
//!    shared kernel state (verdicts, the node backstop's interface watcher) and sends what
//!    makes an agent the node's: its hold on the pin directory's lock, its listening socket
//!    and its metrics socket. They are the same sockets, not copies bound again: connections
//!    queued on them stay queued.
//! 2. `installing` → `go`: the next agent is about to write kernel state, and the serving
//!    one commits to letting it. Until `go` the serving agent can take its duties back (it
//!    answers `resumed`, and the next agent stops); after it, never. A serving agent that is
//!    stopping answers nothing, and the next agent goes on alone.
//! 3. The next agent installs its programs (each pinned link's program is replaced
//!    atomically) and says `serving` (it reconciles the verdicts meanwhile).
//! 4. The serving agent answers `draining`, stops accepting, and lets its open connections
//!    finish: each one's next answer says `Connection: close`, idle ones end at the idle
//!    timeout. It then idles until it is stopped.
//!
//! Both agents accept from the same queue until step 4, so no connection finds nobody. If the
//! next agent goes away after `go` and before `serving`, the serving agent cannot know what
//! the kernel now holds: it exits, and restarts from scratch (the programs left attached
//! refuse meanwhile: no one listens on the port they redirect to). A
//! next agent that loses the serving one after step 1 without a `resumed` carries on alone.
use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::{
            fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{self, sockopt, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Where agents meet to hand over, unless told otherwise: a directory on the node, which
/// the chart mounts into every agent pod (the control socket is each pod's own).
pub(crate) const DEFAULT_SOCKET: &str = "/run/imds-filter/handover/agent.sock";

/// The first line the next agent sends; another version's line is refused.
const TAKE: &str = "take imds-filter/1";
const INSTALLING: &str = "installing";
const GO: &str = "go";
const RESUMED: &str = "resumed";
const SERVING: &str = "serving";
const DRAINING: &str = "draining";
/// How long either side waits for a line it expects at once.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long the serving agent stays paused waiting for `installing`.
const INSTALL_WITHIN: Duration = Duration::from_secs(10);
/// How long the serving agent waits, after `go`, for the next one to serve.
pub(crate) const SERVE_WITHIN: Duration = Duration::from_mins(1);
/// The most descriptors a message carries.
const MAX_FDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("the agent at {} answered what this version does not understand: {said:?}", path.display())]
    Protocol { path: PathBuf, said: String },
    #[error("the peer at {} runs as uid {uid}, not as this agent's", path.display())]
    Stranger { path: PathBuf, uid: u32 },
    #[error("the peer at {} did not show that it reaches this node's pin directory", path.display())]
    NoProof { path: PathBuf },
    #[error("the earlier agent took its duties back before this one touched the kernel")]
    TakenBack,
    #[error("this agent is stopping: the next one takes the node on its own")]
    Stopping,
}

/// What a handover carries besides the descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    /// The serving agent's process id (in its PID namespace), for the logs.
    pid: u32,
    /// Whether a metrics socket follows the lock and the listener.
    metrics: bool,
}

/// What the serving agent hands over: holds on its own descriptors (`dup`s of them).
pub(crate) struct Offer {
    /// The pin directory, locked: also what a taker's proof is checked against.
    pub lock: OwnedFd,
    pub listener: OwnedFd,
    pub metrics: Option<OwnedFd>,
}

/// What the serving agent does while it hands over. Each returns once done: `pause` only
/// once no write to shared kernel state is under way.
pub(crate) trait Duties: Send + 'static {
    /// Stop writing shared kernel state: the next agent may take over. `false` when this
    /// agent is stopping: it hands nothing over then.
    fn pause(&self) -> bool;
    /// The next agent went away before it touched the kernel: take the duties back.
    fn resume(&self);
    /// The next agent is about to write the kernel's state: `true` lets it, and this agent
    /// never writes it again. `false` when this agent is stopping: it then says nothing more,
    /// and the next agent goes on alone.
    fn commit(&self) -> bool;
    /// The next agent serves: stop accepting, drain, and idle.
    fn retire(&self);
    /// The next agent went away after it was let write the kernel's state, and before it
    /// served: what the kernel holds is unknown. Never returns (the agent exits).
    fn abandon(&self, why: &str) -> !;
}

/// Listens at `path`, replacing a socket an earlier agent left there, and hands over to the
/// first agent that asks and serves; on its own thread (the exchange blocks, briefly).
pub(crate) fn offer(path: &Path, offer: Offer, duties: impl Duties) -> Result<(), HandoverError> {
    let listener = bind(path)?;
    let at = path.to_owned();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match hand_over(&at, &stream, &offer, &duties) {
                    Ok(()) => {
                        tracing::info!("handed the node over to the next agent; draining");
                        return; // the listener closes; the path is the next agent's now
                    }
                    Err(e) => {
                        let error = format!("{:#}", anyhow::Error::from(e));
                        tracing::warn!(%error, "a handover did not complete; this agent goes on serving");
                    }
                }
            }
        })
        .map_err(io_err("starting the handover thread for", path))?;
    Ok(())
}

/// A Unix socket at `path`, owner-only, in a directory made owner-only if this creates it.
fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating the directory of", path))?;
    }
    // Only the agent holding the pin directory's lock gets here: a socket at the path is an
    // earlier agent's, which no longer hands over.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("removing the old", path)(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(io_err("binding the handover socket", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("restricting", path))?;
    Ok(listener)
}

/// One handover on `stream`: `Ok` once the next agent serves and this one has retired;
/// `Err` when it went away before it touched the kernel (this one then serves on).
fn hand_over(path: &Path, stream: &UnixStream, offer: &Offer, duties: &impl Duties) -> Result<(), HandoverError> {
    same_user(path, stream)?;
    let timeouts = |read| -> Result<(), HandoverError> {
        stream.set_read_timeout(Some(read)).map_err(io_err("configuring", path))?;
        stream.set_write_timeout(Some(ANSWER_WITHIN)).map_err(io_err("configuring", path))
    };
    timeouts(ANSWER_WITHIN)?;
    let (take, proof) = receive(stream).map_err(io_err("reading from", path))?;
    if take != TAKE.as_bytes() {
        return Err(HandoverError::Protocol { path: path.to_owned(), said: String::from_utf8_lossy(&take).into() });
    }
    if !proof.first().is_some_and(|fd| same_file(fd, &offer.lock)) || proof.len() != 1 {
        return Err(HandoverError::NoProof { path: path.to_owned() });
    }

    if !duties.pause() {
        return Err(HandoverError::Stopping);
    }
    let mut lines = BufReader::new(stream.try_clone().map_err(io_err("reading", path))?);
    let asked = send(stream, offer).map_err(io_err("handing over on", path)).and_then(|()| {
        timeouts(INSTALL_WITHIN)?;
        expect_line(path, &mut lines, INSTALLING)
    });
    if let Err(e) = asked {
        // Best effort: a next agent still there must not install.
        let _ = say(path, stream, RESUMED);
        duties.resume();
        return Err(e);
    }
    if !duties.commit() {
        return Err(HandoverError::Stopping); // closed unanswered: the next agent goes on alone
    }
    if let Err(e) = say(path, stream, GO) {
        duties.abandon(&format!(
            "the next agent went away as it was let take the node over ({:#}); what the kernel holds is \
             unknown, so this agent exits to start again from scratch",
            anyhow::Error::from(e)
        ));
    }

    // Committed: the next agent writes the kernel's state from here on.
    let served = timeouts(SERVE_WITHIN).and_then(|()| expect_line(path, &mut lines, SERVING));
    if let Err(e) = served.and_then(|()| say(path, stream, DRAINING)) {
        duties.abandon(&format!(
            "the next agent went away while it took the node over ({:#}); what the kernel holds is unknown, so \
             this agent exits to start again from scratch",
            anyhow::Error::from(e)
        ));
    }
    duties.retire();
    Ok(())
}

fn say(path: &Path, mut stream: &UnixStream, line: &str) -> Result<(), HandoverError> {
    stream.write_all(format!("{line}\n").as_bytes()).map_err(io_err("writing to", path))
}

fn send(stream: &UnixStream, offer: &Offer) -> io::Result<()> {
    let header = Header { pid: std::process::id(), metrics: offer.metrics.is_some() };
    let line = serde_json::to_string(&header).map_err(io::Error::other)?;
    let fds = [Some(&offer.lock), Some(&offer.listener), offer.metrics.as_ref()];
    send_line(stream, &line, fds.into_iter().flatten())
}

/// One line, with descriptors.
fn send_line<'a>(stream: &UnixStream, line: &str, fds: impl Iterator<Item = &'a OwnedFd>) -> io::Result<()> {
    let line = format!("{line}\n");
    let fds: Vec<RawFd> = fds.map(AsRawFd::as_raw_fd).collect();
    let iov = [io::IoSlice::new(line.as_bytes())];
    let sent =
        socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)?;
    if sent != line.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "a handover line was cut short"));
    }
    Ok(())
}

/// Whether two descriptors are the same file (device and inode).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let meta = |fd: &OwnedFd| fd.try_clone().map(fs::File::from).and_then(|f| f.metadata());
    matches!((meta(a), meta(b)), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// Refuses a peer of another user.
fn same_user(path: &Path, stream: &UnixStream) -> Result<(), HandoverError> {
    let peer =
        socket::getsockopt(stream, sockopt::PeerCredentials).map_err(|e| io_err("asking who is at", path)(e.into()))?;
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        return Err(HandoverError::Stranger { path: path.to_owned(), uid: peer.uid() });
    }
    Ok(())
}

/// The next line, `Ok("")` at the end of the stream.
fn read_line(path: &Path, lines: &mut BufReader<UnixStream>) -> Result<String, HandoverError> {
    let mut line = String::new();
    lines.by_ref().take(256).read_line(&mut line).map_err(io_err("reading from", path))?;
    Ok(line.trim_end().to_owned())
}

fn expect_line(path: &Path, lines: &mut BufReader<UnixStream>, want: &str) -> Result<(), HandoverError> {
    let line = read_line(path, lines)?;
    if line != want {
        return Err(HandoverError::Protocol { path: path.to_owned(), said: line });
    }
    Ok(())
}

/// What the next agent receives.
pub(crate) struct Taken {
    /// The pin directory's lock, held together with the earlier agent until it lets go.
    pub lock: OwnedFd,
    /// The earlier agent's listening socket (the same socket, with its queue).
    pub listener: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
    /// The earlier agent's process id, in its PID namespace.
    pub from: u32,
    path: PathBuf,
    lines: BufReader<UnixStream>,
    /// The earlier agent is gone: nothing more to tell it.
    alone: bool,
}

impl Taken {
    /// Tells the earlier agent that this one is about to write the kernel's state. An error
    /// means it took its duties back: this agent must not go on. If it is gone, this agent
    /// goes on alone.
    pub(crate) fn installing(&mut self) -> Result<(), HandoverError> {
        // A failed write is no answer: the earlier agent may have said `resumed` and closed.
        let _ = say(&self.path, self.lines.get_ref(), INSTALLING);
        match read_line(&self.path, &mut self.lines) {
            Ok(line) if line == GO => Ok(()),
            Ok(line) if line == RESUMED => Err(HandoverError::TakenBack),
            // Closed unanswered: the earlier agent is gone, or stopping.
            Ok(line) if line.is_empty() => {
                self.alone = true;
                Ok(())
            }
            Err(HandoverError::Io { source, .. }) if source.kind() == io::ErrorKind::ConnectionReset => {
                self.alone = true;
                Ok(())
            }
            Ok(said) => Err(HandoverError::Protocol { path: self.path.clone(), said }),
            Err(e) => Err(e),
        }
    }

    /// Tells the earlier agent that this one serves, and waits until it has stopped
    /// accepting. Whatever it answers, this agent serves: after `go` the node is its own.
    pub(crate) fn serving(mut self) {
        if self.alone {
            return;
        }
        let answered = say(&self.path, self.lines.get_ref(), SERVING)
            .and_then(|()| expect_line(&self.path, &mut self.lines, DRAINING));
        if let Err(e) = answered {
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::warn!(%error, "the earlier agent did not confirm that it drains; this agent serves the node");
        }
    }
}

/// Asks the agent at `path` to hand over, showing it the pin directory `pin_dir`. `Ok(None)`:
/// no agent offers there (none runs, or one of a version that does not hand over).
pub(crate) fn take(path: &Path, pin_dir: &Path) -> Result<Option<Taken>, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io_err("connecting to", path)(e)),
    };
    same_user(path, &stream)?;
    stream.set_read_timeout(Some(ANSWER_WITHIN)).map_err(io_err("configuring", path))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN)).map_err(io_err("configuring", path))?;
    let proof: OwnedFd = fs::File::open(pin_dir).map_err(io_err("opening", pin_dir))?.into();
    send_line(&stream, TAKE, std::iter::once(&proof)).map_err(io_err("asking", path))?;
    let (header, fds) = receive(&stream).map_err(io_err("receiving the handover from", path))?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| HandoverError::Protocol {
        path: path.to_owned(),
        said: String::from_utf8_lossy(&header).into(),
    })?;
    let wanted = 2 + usize::from(header.metrics);
    let count = fds.len();
    let mut fds = fds.into_iter();
    let (Some(lock), Some(listener), true) = (fds.next(), fds.next(), count == wanted) else {
        return Err(HandoverError::Protocol {
            path: path.to_owned(),
            said: format!("{count} descriptors, not {wanted}"),
        });
    };
    let listener = Some(TcpListener::from(listener));
    let metrics = fds.next().map(TcpListener::from);
    // Later answers come after the earlier agent's own waits, which bound them.
    stream.set_read_timeout(Some(SERVE_WITHIN + ANSWER_WITHIN)).map_err(io_err("configuring", path))?;
    let lines = BufReader::new(stream);
    Ok(Some(Taken { lock, listener, metrics, from: header.pid, path: path.to_owned(), lines, alone: false }))
}

/// One line and the descriptors that came with it (the line without its newline).
fn receive(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buffer = [0u8; 512];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (read, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let message =
            socket::recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }));
            }
        }
        if message.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("more descriptors than a handover carries"));
        }
        (message.bytes, fds)
    };
    let mut line = buffer[..read].to_vec();
    // The line is short; a stream may still deliver it in pieces. Nothing follows it before
    // the peer's next answer, so reading byte by byte takes nothing that is not the line's.
    while !line.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        if line.len() >= buffer.len() || (&*stream).read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    line.pop();
    Ok((line, fds))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HandoverError {
    let path = path.to_owned();
    move |source| HandoverError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    //! The exchange between two agents, over a real socket in a temporary directory.
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<&'static str>>>);

    impl Duties for Record {
        fn pause(&self) -> bool {
            self.0.lock().unwrap().push("pause");
            true
        }
        fn commit(&self) -> bool {
            self.0.lock().unwrap().push("commit");
            true
        }
        fn resume(&self) {
            self.0.lock().unwrap().push("resume");
        }
        fn retire(&self) {
            self.0.lock().unwrap().push("retire");
        }
        fn abandon(&self, _why: &str) -> ! {
            self.0.lock().unwrap().push("abandon");
            // Stands in for the exit: the handover thread stops here.
            loop {
                std::thread::park();
            }
        }
    }

    /// An agent offering at `dir/handover/agent.sock`, its pin directory `dir`.
    fn offered(dir: &Path) -> (PathBuf, TcpListener, Record) {
        let path = dir.join("handover").join("agent.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let lock = fs::File::open(dir).unwrap();
        let offer = Offer { lock: lock.into(), listener: listener.try_clone().unwrap().into(), metrics: None };
        let record = Record::default();
        super::offer(&path, offer, record.clone()).unwrap();
        (path, listener, record)
    }

    fn wait_for(record: &Record, want: &[&str]) {
        for _ in 0..300 {
            if *record.0.lock().unwrap() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("duties {:?}, wanted {want:?}", record.0.lock().unwrap());
    }

    #[test]
    fn the_next_agent_gets_the_same_socket_and_the_earlier_one_retires() {
        let dir = tempfile::tempdir().unwrap();
        let (path, listener, record) = offered(dir.path());
        let mut taken = take(&path, dir.path()).unwrap().expect("an agent offers");
        assert_eq!(taken.from, std::process::id());
        let handed = taken.listener.take().expect("the listener");
        assert_eq!(handed.local_addr().unwrap(), listener.local_addr().unwrap());
        assert!(taken.metrics.is_none());
        // The same socket: a connection queued on it is accepted through the handed one.
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener);
        assert!(handed.accept().is_ok());
        wait_for(&record, &["pause"]);
        taken.installing().unwrap();
        taken.serving();
        wait_for(&record, &["pause", "commit", "retire"]);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_next_agent_that_goes_away_before_it_installs_gives_the_duties_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _listener, record) = offered(dir.path());
        drop(take(&path, dir.path()).unwrap().expect("an agent offers"));
        wait_for(&record, &["pause", "resume"]);
        // And the serving agent still offers.
        let mut again = take(&path, dir.path()).unwrap().expect("still offered");
        again.installing().unwrap();
        again.serving();
        wait_for(&record, &["pause", "resume", "pause", "commit", "retire"]);
    }

    #[test]
    fn a_next_agent_that_goes_away_after_go_makes_the_earlier_one_start_again() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _listener, record) = offered(dir.path());
        let mut taken = take(&path, dir.path()).unwrap().expect("an agent offers");
        taken.installing().unwrap();
        drop(taken);
        wait_for(&record, &["pause", "commit", "abandon"]);
    }

    /// A serving agent at `path` that hands over to the first taker, then does `then`.
    fn predecessor(path: &Path, then: impl FnOnce(&UnixStream) + Send + 'static) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let (line, _proof) = receive(&stream).unwrap();
            assert_eq!(line, TAKE.as_bytes());
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            let lock: OwnedFd = fs::File::open(std::env::temp_dir()).unwrap().into();
            send(&stream, &Offer { lock, listener: tcp.into(), metrics: None }).unwrap();
            then(&stream);
        })
    }

    #[test]
    fn a_next_agent_whose_predecessor_is_gone_goes_on_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let serving = predecessor(&path, |_| {}); // it dies once it has handed over
        let mut taken = take(&path, dir.path()).unwrap().expect("an agent offers");
        serving.join().unwrap();
        taken.installing().expect("no one to take the duties back: go on");
        taken.serving();
    }

    #[test]
    fn a_next_agent_told_that_the_duties_were_taken_back_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // As after INSTALL_WITHIN: it takes its duties back and closes, unasked.
        let serving = predecessor(&path, |stream| say(Path::new("test"), stream, RESUMED).unwrap());
        let mut taken = take(&path, dir.path()).unwrap().expect("an agent offers");
        serving.join().unwrap();
        assert!(matches!(taken.installing(), Err(HandoverError::TakenBack)));
    }

    #[test]
    fn nobody_there_is_no_handover() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take(&dir.path().join("agent.sock"), dir.path()).unwrap().is_none());
        let (path, _listener, _record) = offered(dir.path());
        // A socket file nobody listens on any more.
        fs::remove_file(&path).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        assert!(take(&path, dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_taker_without_the_pin_directory_or_of_another_version_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _listener, record) = offered(dir.path());
        let elsewhere = tempfile::tempdir().unwrap();
        let refused = take(&path, elsewhere.path());
        assert!(matches!(refused, Err(HandoverError::Io { .. })), "no descriptors handed: {:?}", refused.is_ok());
        for line in ["take imds-filter/0\n", "take imds-filter/1\n"] {
            // The second without a proof.
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(line.as_bytes()).unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).unwrap();
            assert!(answer.is_empty(), "nothing handed over for {line:?}");
        }
        assert!(record.0.lock().unwrap().is_empty(), "the duties were never paused");
    }
}

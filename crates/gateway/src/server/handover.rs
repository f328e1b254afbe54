//! Binary upgrade by handing the listening sockets over, as nginx's binary upgrade and
//! Envoy's hot restart do.
//!
//! The running gateway (on SIGUSR2, see `shopmesh gateway`) starts the binary now installed
//! at its own path with its own arguments, its listening sockets inherited: their
//! `FD_CLOEXEC` flag cleared in the child only, between fork and exec, and their numbers
//! in [`ENV`]. The new process adopts them instead of binding ([`Inherited::from_env`]),
//! loads its configuration, starts serving and writes one byte to a pipe it inherited too
//! ([`Inherited::announce_ready`]). Only then does the old process stop accepting and
//! drain. A socket is one kernel object however many processes hold it: its accept queue
//! is never closed, so no connection is lost, and no sysctl is needed. If the new process
//! fails (it exits, or is not ready in time), the old one keeps serving as if nothing
//! happened.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Names the inherited sockets: `PID;proxy=3,4;admin=5;ready=6`. PID is the process that
/// handed them over, which must be the reader's parent: a stale value (an environment
/// copied into another process) is ignored rather than trusted with descriptor numbers.
pub const ENV: &str = "SHOPMESH_INHERITED_FDS";

/// Listening sockets handed over by the process this one replaces.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The proxy's listeners (one per worker of the old process, all in one
    /// `SO_REUSEPORT` group).
    pub proxy: Vec<TcpListener>,
    /// The admin API's listener.
    pub admin: Option<TcpListener>,
    /// Where to say "ready" to the old process.
    ready: Option<std::fs::File>,
}

impl Inherited {
    /// Reads [`ENV`]. `None` when this process was not started by an upgrade (or the
    /// value is stale or malformed, which is logged).
    pub fn from_env() -> Option<Self> {
        let spec = std::env::var(ENV).ok()?;
        match Self::parse(&spec) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(error = %e, "{ENV} ignored");
                None
            }
        }
    }

    fn parse(spec: &str) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        let mut parts = spec.split(';');
        let pid: u32 = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| bad("no process id"))?;
        if pid != std::os::unix::process::parent_id() {
            return Err(bad("set by a process that is not this one's parent"));
        }
        let (mut proxy, mut admin, mut ready) = (Vec::new(), None, None);
        for part in parts {
            let (name, fds) = part.split_once('=').ok_or_else(|| bad("no `=`"))?;
            let fds: Vec<RawFd> = fds
                .split(',')
                .filter(|f| !f.is_empty())
                .map(|f| f.parse().map_err(|_| bad("not a descriptor number")))
                .collect::<io::Result<_>>()?;
            match name {
                "proxy" => proxy = fds,
                "admin" => admin = fds.first().copied(),
                "ready" => ready = fds.first().copied(),
                _ => return Err(bad("unknown part")),
            }
        }
        // Each number must be a descriptor this process holds, of the right kind, before
        // it is owned (and one day closed) here.
        let listener = |fd: RawFd| -> io::Result<TcpListener> {
            if fd <= 2 || !is_listening_socket(fd) {
                return Err(bad("not a listening socket"));
            }
            set_cloexec(fd, true)?;
            // SAFETY: a listening socket this process inherited and nothing else owns.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let ready = match ready {
            Some(fd) if fd > 2 && is_pipe(fd) => {
                set_cloexec(fd, true)?;
                // SAFETY: the write end of the pipe the parent made for this process.
                Some(unsafe { std::fs::File::from_raw_fd(fd) })
            }
            Some(_) => return Err(bad("the ready descriptor is not a pipe")),
            None => None,
        };
        Ok(Self {
            proxy: proxy.into_iter().map(listener).collect::<io::Result<_>>()?,
            admin: admin.map(listener).transpose()?,
            ready,
        })
    }

    /// Takes the listeners, leaving the ready pipe.
    pub fn take_listeners(&mut self) -> (Vec<TcpListener>, Option<TcpListener>) {
        (std::mem::take(&mut self.proxy), self.admin.take())
    }

    /// Tells the old process that this one serves: it then stops accepting and drains.
    pub fn announce_ready(&mut self) {
        if let Some(mut pipe) = self.ready.take()
            && let Err(e) = pipe.write_all(b"R")
        {
            tracing::warn!(error = %e, "cannot tell the old process that this one is ready");
        }
    }
}

/// Starts `exe args` with the listening sockets `proxy` and `admin` inherited, and waits
/// at most `within` for it to announce that it serves. Returns its process id; on error
/// the new process is gone (killed if it had not exited) and the caller serves on.
pub async fn start_successor(
    exe: &Path,
    args: &[OsString],
    proxy: &[OwnedFd],
    admin: Option<&OwnedFd>,
    within: Duration,
) -> io::Result<u32> {
    let (mut reader, writer) = io::pipe()?;
    let proxy: Vec<RawFd> = proxy.iter().map(AsRawFd::as_raw_fd).collect();
    let admin = admin.map(AsRawFd::as_raw_fd);
    let ready = writer.as_raw_fd();
    let list = |fds: &[RawFd]| {
        fds.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut spec = format!("{};proxy={}", std::process::id(), list(&proxy));
    if let Some(a) = admin {
        spec.push_str(&format!(";admin={a}"));
    }
    spec.push_str(&format!(";ready={ready}"));
    let mut inherit = proxy.clone();
    inherit.extend(admin);
    inherit.push(ready);
    let mut cmd = Command::new(exe);
    cmd.args(args).env(ENV, &spec);
    // SAFETY: between fork and exec the closure only calls fcntl (async-signal-safe) on
    // descriptors this process holds open until `spawn` returns, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                set_cloexec(fd, false)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Only the child holds the write end now: end of file means it exited.
    drop(writer);
    let pid = child.id();
    tracing::info!(pid, exe = %exe.display(), "upgrade: new process started with the listeners");
    let said = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        reader.read(&mut b).map(|n| n == 1)
    });
    let failure = match tokio::time::timeout(within, said).await {
        Ok(Ok(Ok(true))) => return Ok(pid),
        Ok(Ok(Ok(false))) => "exited before it was ready".to_owned(),
        Ok(Ok(Err(e))) => format!("its pipe failed: {e}"),
        Ok(Err(e)) => format!("the wait failed: {e}"),
        Err(_) => format!("not ready within {} s", within.as_secs()),
    };
    let _ = child.kill();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(io::Error::other)??;
    Err(io::Error::other(format!(
        "the new process {pid} {failure} ({status})"
    )))
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number; an invalid one is an error, not UB.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn is_listening_socket(fd: RawFd) -> bool {
    let int_opt = |level, name| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a c_int-sized buffer for an integer option.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    int_opt(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
}

fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: fstat into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_or_malformed_value_is_refused() {
        // Not from the parent.
        assert!(Inherited::parse("1;proxy=3").is_err());
        let parent = std::os::unix::process::parent_id();
        assert!(Inherited::parse(&format!("{parent};bogus=3")).is_err());
        assert!(Inherited::parse(&format!("{parent};proxy=x")).is_err());
        // A descriptor that is not a listening socket (stdin, or a plain file) is not
        // adopted.
        assert!(Inherited::parse(&format!("{parent};proxy=0")).is_err());
        let f = tempfile::tempfile().unwrap();
        assert!(Inherited::parse(&format!("{parent};proxy={}", f.as_raw_fd())).is_err());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!is_listening_socket(c.as_raw_fd()));
        assert!(is_listening_socket(l.as_raw_fd()));
        let empty = Inherited::parse(&format!("{parent};proxy=")).unwrap();
        assert!(empty.proxy.is_empty() && empty.admin.is_none());
    }

    #[test]
    fn cloexec_is_set_and_cleared() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        let get = || unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_ne!(get(), 0, "std opens sockets close-on-exec");
        set_cloexec(fd, false).unwrap();
        assert_eq!(get(), 0);
        set_cloexec(fd, true).unwrap();
        assert_ne!(get(), 0);
    }
}

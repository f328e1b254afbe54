//! The access log's writer: one JSON line per request, formatted by code made for that one
//! line into a buffer of the thread that served the request, written to stdout in chunks.
//!
//! Through `tracing`, each line was formatted field by field, queued to the log thread and
//! woke it: about 2.5 system calls per request (`futex` wake-ups and the log thread's
//! `sched_yield` spinning, `bench/syscalls.sh`). Here a request appends to its thread's
//! buffer under that thread's own lock (never contended but by the flusher), and the buffer
//! goes out in one `write` when it holds [`FLUSH_BYTES`], or at the latest [`FLUSH_EVERY`]
//! later (a flusher thread), or when the gateway stops ([`flush_all`]).
//!
//! **What a crash can lose**: a process killed without stopping (`kill -9`, an abort) loses
//! the lines of the last [`FLUSH_EVERY`] at most, up to [`FLUSH_BYTES`] per thread.
//!
//! The line has the fields and names the `tracing` JSON line had (`timestamp`, `level`,
//! `target`, then the request's), so what reads the log is unchanged; it is JSON whatever
//! the log format of the rest, and it is written whatever `RUST_LOG` says: `access_log:
//! true` in the configuration is the switch. Lines from different threads never interleave
//! within a line: every chunk is whole lines, written under stdout's lock.

use std::io::Write;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use crate::worker::lock;

/// A thread's buffer is written out once it holds this much.
pub const FLUSH_BYTES: usize = 16 * 1024;
/// And at the latest this long after its first line.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

type Buffer = Arc<Mutex<Vec<u8>>>;

/// Every thread's buffer, for the flusher (threads that ended are dropped once empty).
static BUFFERS: LazyLock<Mutex<Vec<Buffer>>> = LazyLock::new(|| {
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush_all();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "access log: no flusher thread; lines go out by size only");
    }
    Mutex::new(Vec::new())
});

thread_local! {
    static LOCAL: Buffer = {
        let b: Buffer = Arc::new(Mutex::new(Vec::with_capacity(FLUSH_BYTES + 1024)));
        lock(&BUFFERS).push(b.clone());
        b
    };
}

fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    // A full pipe or a closed stdout loses these lines, not the request.
    let _ = out.write_all(buf).and_then(|()| out.flush());
    buf.clear();
}

/// Writes out every thread's buffer now (the flusher's tick, and at the gateway's stop).
pub fn flush_all() {
    let buffers: Vec<Buffer> = {
        let mut all = lock(&BUFFERS);
        // A thread that ended leaves its buffer here alone: written out below, then gone.
        all.retain(|b| Arc::strong_count(b) > 1 || !lock(b).is_empty());
        all.clone()
    };
    for b in buffers {
        write_out(&mut lock(&b));
    }
}

/// One request's line; strings are escaped as JSON strings.
pub(crate) struct Line<'a> {
    pub client: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub variant: &'a str,
    pub cluster: &'a str,
    pub endpoint: &'a str,
    pub attempts: u32,
    pub caller: &'a str,
    pub duration_ms: f64,
    pub request_id: &'a str,
    pub trace_id: &'a str,
}

impl Line<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let s = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            let _ = serde_json::to_writer(&mut *out, v);
        };
        let now = chrono::Utc::now();
        let _ = write!(
            out,
            "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"target\":\"shopmesh::access\"",
            now.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        );
        match self.client {
            Some(ip) => {
                let _ = write!(out, ",\"client\":\"{ip}\"");
            }
            None => out.extend_from_slice(b",\"client\":\"\""),
        }
        s(out, "method", self.method);
        s(out, "path", self.path);
        let _ = write!(out, ",\"status\":{}", self.status);
        s(out, "route", self.route);
        s(out, "variant", self.variant);
        s(out, "cluster", self.cluster);
        s(out, "endpoint", self.endpoint);
        let _ = write!(out, ",\"attempts\":{}", self.attempts);
        s(out, "caller", self.caller);
        let _ = write!(out, ",\"duration_ms\":{}", self.duration_ms);
        s(out, "request_id", self.request_id);
        s(out, "trace_id", self.trace_id);
        out.extend_from_slice(b"}\n");
    }
}

/// Appends `line` to this thread's buffer, writing the buffer out when it is full.
pub(crate) fn log(line: &Line<'_>) {
    LOCAL.with(|b| {
        let mut buf = lock(b);
        line.write(&mut buf);
        if buf.len() >= FLUSH_BYTES {
            write_out(&mut buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(path: &'a str, caller: &'a str) -> Line<'a> {
        Line {
            client: Some("203.0.113.9".parse().unwrap()),
            method: "GET",
            path,
            status: 200,
            route: "r",
            variant: "",
            cluster: "up",
            endpoint: "http://127.0.0.1:1",
            attempts: 1,
            caller,
            duration_ms: 1.25,
            request_id: "rid",
            trace_id: "0af7651916cd43dd8448eb211c80319c",
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_the_tracing_names() {
        let mut out = Vec::new();
        line("/a\"b\\c\n\u{1}é", "user-1").write(&mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "shopmesh::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["path"], "/a\"b\\c\n\u{1}é");
        assert_eq!(v["status"], 200);
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["duration_ms"], 1.25);
        assert_eq!(v["client"], "203.0.113.9");
        assert_eq!(v["caller"], "user-1");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn lines_wait_in_the_thread_buffer_until_full_or_flushed() {
        // On a thread of its own: its buffer is its own.
        std::thread::spawn(|| {
            log(&line("/x", ""));
            let held = LOCAL.with(|b| lock(b).len());
            assert!(held > 0 && held < FLUSH_BYTES, "held {held}");
            // Filling it past the threshold writes it out.
            while LOCAL.with(|b| lock(b).len()) > 0 {
                log(&line("/filler", ""));
            }
            log(&line("/y", ""));
            flush_all();
            assert_eq!(LOCAL.with(|b| lock(b).len()), 0);
        })
        .join()
        .unwrap();
    }
}

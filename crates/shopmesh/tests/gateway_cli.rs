//! `shopmesh gateway --check` and `--schema`: every example validates, a broken file is
//! refused with its line and column, and the committed JSON Schema is the generated one.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shopmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shopmesh"))
        .args(args)
        .output()
        .expect("run shopmesh")
}

#[test]
fn every_example_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = shopmesh(&["gateway", "--check", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
            checked += 1;
        }
    }
    assert!(checked >= 2, "examples/ holds the gateway configs");
}

#[test]
fn a_broken_config_is_refused_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(repo().join("examples/gateway.yaml"))
        .unwrap()
        .replace(
            "    cluster: app\n    auth:",
            "    cluster: app\n    atuh: {}\n    auth:",
        );
    std::fs::write(&path, text).unwrap();
    let out = shopmesh(&["gateway", "--check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("atuh") && err.contains("line"), "{err}");

    std::fs::write(
        &path,
        "clusters: []\nroutes:\n  - { name: r, match: { prefix: / }, cluster: x }\n",
    )
    .unwrap();
    let out = shopmesh(&["gateway", "--check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown cluster `x`"));

    let out = shopmesh(&["gateway", "--check", "--config", "/nonexistent.yaml"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let out = shopmesh(&["gateway", "--schema"]);
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(repo().join("examples/gateway.schema.json"))
        .expect("examples/gateway.schema.json (regenerate: shopmesh gateway --schema)");
    assert_eq!(
        generated.trim(),
        committed.trim(),
        "regenerate with: cargo run -- gateway --schema > examples/gateway.schema.json"
    );
}

/// A stand-in upstream on a thread: answers every request of every connection with 200.
fn upstream() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    // The request head; requests here have no body.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    if conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `access_log: true`: one JSON line per request on stdout (the per-thread buffers are
/// written out when the gateway stops, whatever their size), with the names the log had.
#[test]
fn the_access_log_has_a_line_per_request_written_out_at_the_stop() {
    use std::io::{BufRead, BufReader, Read, Write};
    let up = upstream();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nworkers: 2\naccess_log: true\n\
             clusters: [{{ name: up, endpoints: [\"http://{up}\"] }}]\n\
             routes: [{{ name: r, match: {{ prefix: / }}, cluster: up }}]\n"
        ),
    )
    .unwrap();
    /// Kills the gateway if the test fails before it stops it.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_shopmesh"))
            .args(["gateway", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr = first.trim().rsplit("http://").next().unwrap().to_owned();
    let n = 40;
    for i in 0..n {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "GET /p{i} HTTP/1.1\r\nhost: t\r\nx-request-id: rid-{i}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Well under a buffer's size, and stopped at once: the stop writes them out.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.0.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "shopmesh::access")
        .collect();
    assert_eq!(lines.len(), n, "{rest}");
    let mut paths: Vec<String> = lines
        .iter()
        .map(|v| v["path"].as_str().unwrap().to_owned())
        .collect();
    paths.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("/p{i}")).collect();
    want.sort();
    assert_eq!(paths, want);
    for v in &lines {
        assert_eq!(v["status"], 200);
        assert_eq!(v["route"], "r");
        assert_eq!(v["level"], "INFO");
        assert!(v["request_id"].as_str().unwrap().starts_with("rid-"));
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    }
}

//! `shopmesh mesh ca init`, `shopmesh mesh cert issue` and `shopmesh sidecar` as a user
//! runs them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn shopmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shopmesh"))
}

#[test]
fn a_ca_its_certificates_and_a_sidecar_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["mesh", "ca", "init", "--dir", d]);
    let again = shopmesh()
        .args(["mesh", "ca", "init", "--dir", d])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing CA is never overwritten"
    );
    let issued = ok(&[
        "mesh",
        "cert",
        "issue",
        "--service",
        "payments",
        "--dir",
        d,
        "--ttl-hours",
        "2",
    ]);
    assert!(issued.contains("payments.pem"), "{issued}");
    let bad = shopmesh()
        .args(["mesh", "cert", "issue", "--service", "Bad Name", "--dir", d])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap();
    drop(admin);
    let config = dir.path().join("payments.yaml");
    std::fs::write(
        &config,
        format!(
            "service: payments\ninbound: {{ listen: '127.0.0.1:0', local: 'http://127.0.0.1:7007' }}\nadmin: {{ listen: '{admin_addr}' }}\ntls: {{ ca_file: '{d}/ca.pem', cert_file: '{d}/payments.pem', key_file: '{d}/payments-key.pem' }}\npolicy:\n  - from: orders\n"
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    ok(&["sidecar", "--config", cfg, "--check"]);
    // Another service's certificate is refused.
    ok(&["mesh", "cert", "issue", "--service", "orders", "--dir", d]);
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("payments.pem", "orders.pem")
            .replace("payments-key.pem", "orders-key.pem"),
    )
    .unwrap();
    let out = shopmesh()
        .args(["sidecar", "--config", wrong.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("orders's certificate"));

    let mut child = shopmesh()
        .args(["sidecar", "--config", cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let served = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(admin_addr) {
            use std::io::{Read, Write};
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no admin port");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

/// A free address on 127.0.0.1, never handed out before in this process.
fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], shopmesh_test_support::free_port()))
}

/// One HTTP/1.1 request through `at`, its status line.
fn status_of(at: std::net::SocketAddr, method: &str, host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines().next().unwrap_or_default().to_owned()
}

/// Kills the child processes when the test ends, however it ends.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `shopmesh ARGS`, which must succeed: its standard output.
fn ok(args: &[&str]) -> String {
    let out = shopmesh().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `shopmesh ARGS` in the background, its output dropped.
fn spawn(args: &[&str]) -> std::process::Child {
    shopmesh()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A mesh directory with its CA and a certificate for orders and for pricing.
fn mesh_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["mesh", "ca", "init", "--dir", d]);
    for s in ["orders", "pricing"] {
        ok(&["mesh", "cert", "issue", "--service", s, "--dir", d]);
    }
    dir
}

/// `shopmesh mesh sidecar-config --dir DIR ARGS` written to DIR/NAME.yaml, checked, and the
/// sidecar started from it.
fn sidecar(dir: &std::path::Path, name: &str, args: &[&str]) -> std::process::Child {
    let d = dir.to_str().unwrap();
    let cfg = ok(&[&["mesh", "sidecar-config", "--dir", d][..], args].concat());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).unwrap();
    let p = path.to_str().unwrap();
    ok(&["sidecar", "--config", p, "--check"]);
    spawn(&["sidecar", "--config", p])
}

#[test]
fn the_shops_sidecars_run_from_the_configurations_it_generates() {
    let dir = mesh_dir();
    let d = dir.path().to_str().unwrap();
    // pricing's local service: the bench backend answers GET /api/prices/{id}.
    let (backend, inbound, outbound) = (free_addr(), free_addr(), free_addr());
    let (b, i, o) = (
        backend.to_string(),
        inbound.to_string(),
        outbound.to_string(),
    );
    // A service outside the mesh, and a flag of the other side, are refused.
    for bad in [
        &["--service", "catalog"][..],
        &["--service", "pricing", "--target", "users=127.0.0.1:1"][..],
        &["--service", "orders", "--local", "127.0.0.1:1"][..],
    ] {
        let out = shopmesh()
            .args(["mesh", "sidecar-config", "--dir", d])
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
    }
    let mut children = Children(vec![spawn(&["bench", "backend", "--listen", &b])]);
    let p = dir.path();
    children.0.push(sidecar(
        p,
        "pricing",
        &["--service", "pricing", "--listen", &i, "--local", &b],
    ));
    let target = format!("pricing={i}");
    children.0.push(sidecar(
        p,
        "orders",
        &["--service", "orders", "--listen", &o, "--target", &target],
    ));
    // orders → pricing through both sidecars, over mutual TLS, as the policy allows.
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(outbound).is_ok() {
            last = status_of(outbound, "GET", "pricing", "/api/prices/1");
            if last.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
    // The shop's policy came with the configuration: orders may only read prices.
    let denied = status_of(outbound, "POST", "pricing", "/api/prices/1");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // No sidecar of payments runs: the call fails at the outbound sidecar, not elsewhere.
    let absent = status_of(outbound, "GET", "payments", "/api/payment-methods");
    assert!(
        absent.starts_with("HTTP/1.1 502") || absent.starts_with("HTTP/1.1 503"),
        "{absent}"
    );
}

#[test]
fn a_callee_sidecar_killed_under_load_loses_no_request() {
    let dir = mesh_dir();
    let p = dir.path();
    let mut children = Children(Vec::new());
    // Two instances of pricing (bench backends), each behind its own inbound sidecar process.
    let mut inbound = Vec::new();
    for n in 0..2 {
        let (backend, at) = (free_addr().to_string(), free_addr());
        children
            .0
            .push(spawn(&["bench", "backend", "--listen", &backend]));
        let listen = at.to_string();
        children.0.push(sidecar(
            p,
            &format!("pricing-{n}"),
            &[
                "--service",
                "pricing",
                "--listen",
                &listen,
                "--local",
                &backend,
            ],
        ));
        inbound.push(at);
    }
    let outbound = free_addr();
    let (o, t0, t1) = (
        outbound.to_string(),
        format!("pricing={}", inbound[0]),
        format!("pricing={}", inbound[1]),
    );
    children.0.push(sidecar(
        p,
        "orders",
        &[
            "--service",
            "orders",
            "--listen",
            &o,
            "--target",
            &t0,
            "--target",
            &t1,
        ],
    ));
    let started = Instant::now();
    while !(std::net::TcpStream::connect(outbound).is_ok()
        && inbound
            .iter()
            .all(|a| std::net::TcpStream::connect(a).is_ok())
        && status_of(outbound, "GET", "pricing", "/api/prices/1").starts_with("HTTP/1.1 200"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the mesh did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Four clients call pricing through orders' sidecar for 3 s; after 1 s the first
    // instance's sidecar process is killed (SIGKILL: its connections reset, its port closed).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, failed) = (
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::Mutex::new(Vec::new()),
    );
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = status_of(outbound, "GET", "pricing", "/api/prices/1");
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !status.starts_with("HTTP/1.1 200") {
                        failed.lock().unwrap().push(status);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(1));
        let victim = &mut children.0[1];
        victim.kill().unwrap();
        victim.wait().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let sent = sent.into_inner();
    let failed = failed.into_inner().unwrap();
    assert!(sent > 100, "only {sent} requests sent");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The survivor carries everything now.
    assert!(std::net::TcpStream::connect(inbound[0]).is_err());
    eprintln!("{sent} requests, 0 failed, one of two callee sidecars killed");
}

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
    let ok = |args: &[&str]| {
        let out = shopmesh().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
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

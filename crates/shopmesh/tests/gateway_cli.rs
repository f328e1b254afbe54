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

//! The pattern lab's crash experiment for real (issue 23): the lab runs this package's
//! `shopmesh` executable as `shopmesh up`, kills it with SIGKILL halfway through a burst of
//! orders and starts it again on its data; nothing accepted may be lost, stuck, reserved or
//! charged twice. (The lab's own test has no executable to give it.)

use shopmesh_lab::experiments::Kind;
use shopmesh_lab::experiments::saga::ZERO_WHEN_EXACT;
use shopmesh_lab::{Backend, Options, Outcome, Scale};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_burst_loses_and_doubles_nothing() {
    let opts = Options {
        scale: Scale::smoke(),
        only: Vec::new(),
        backend: Backend::default(),
        progress: false,
        shopmesh: Some(env!("CARGO_BIN_EXE_shopmesh").into()),
    };
    let report = shopmesh_lab::run_kinds(&opts, &[Kind::MessagingCrash])
        .await
        .expect("the lab runs");
    let f = &report.findings[0];
    assert_eq!(f.id, "messaging.crash");
    let figure = |key: &str| {
        f.figures
            .get(key)
            .unwrap_or_else(|| panic!("no figure {key}: {}", f.verdict.because))
    };
    eprintln!("{}\n{}", f.headline, f.verdict.because);
    assert_eq!(figure("kills"), 1.0);
    assert!(figure("orders.accepted_before_kill") > 0.0);
    assert!(figure("orders.accepted_after_kill") > 0.0);
    for key in ZERO_WHEN_EXACT {
        assert_eq!(figure(key), 0.0, "{key}: {}", f.verdict.because);
    }
    assert!(figure("kill_to_serving_ms") > 0.0);
    assert!(figure("all_settled_after_restart_ms") >= 0.0);
    assert_eq!(
        f.verdict.outcome,
        Outcome::Mitigated,
        "{}",
        f.verdict.because
    );
}

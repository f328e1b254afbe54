//! Every service answers as its OpenAPI document says, as schemathesis checks it: statuses,
//! content types and response schemas, on generated valid and invalid requests and on
//! sequences that follow the documents' links (create, then read or change what was
//! created).
//!
//! Needs schemathesis 4.32 (`pip install schemathesis==4.32.5`), hence `#[ignore]`:
//!
//! ```text
//! SHOPMESH_TEST_SCHEMATHESIS=1 cargo test -p shopmesh-e2e --test openapi -- --ignored
//! ```
//!
//! `SHOPMESH_TEST_SCHEMATHESIS` is `1` (the `st` on `PATH`) or the `st` executable to use. A
//! missing schemathesis fails the test; it never skips.

use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use shopmesh_test_support::{ServiceName, TestShop};

/// Test cases per operation and phase: enough to reach every documented status, small
/// enough that the seven runs take about two minutes on two cores.
const MAX_EXAMPLES: &str = "200";
/// The same inputs on every run.
const SEED: &str = "17";
/// Everything schemathesis checks that fits services behind the gateway. Left out:
/// `ignored_auth` (a service trusts the identity the gateway vouches for: any user id is
/// one, by design), `positive_data_acceptance` (what a schema cannot say is refused: Luhn
/// checks, one of two fields, common passwords, `1.0` for an integer) and
/// `negative_data_rejection` (serde reads a struct from a JSON array as well as from an
/// object, so `[null, null]` passes for an object of two optional fields).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      missing_required_header,unsupported_method,allow_header_conformance,\
                      use_after_free,ensure_resource_availability";

fn schemathesis() -> String {
    let st = match std::env::var("SHOPMESH_TEST_SCHEMATHESIS") {
        Ok(v) if !v.is_empty() && v != "1" => v,
        _ => "st".to_owned(),
    };
    let version = Command::new(&st).arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
            st
        }
        Ok(out) => panic!(
            "`{st} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "schemathesis is needed and `{st}` cannot be run ({e}): install it with \
             `pip install schemathesis==4.32.5`, or set SHOPMESH_TEST_SCHEMATHESIS to its `st`"
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs schemathesis: SHOPMESH_TEST_SCHEMATHESIS=1 cargo test -p shopmesh-e2e --test openapi -- --ignored"]
async fn services_conform_to_their_documents() {
    let st = schemathesis();
    let (shop, token) = TestShop::start()
        .await
        .with_admin("conformance-admin@example.test", |_| {})
        .await;
    let me: Value = shop.get_json("/api/users/me", Some(&token)).await;
    let admin_id = me["id"].as_str().expect("the admin's id").to_owned();

    // schemathesis keeps a cache (`.schemathesis/`, crashes it replays) in its working
    // directory: a fresh one per run keeps runs alike and the tree clean.
    let workdir = tempfile::tempdir().expect("a working directory for schemathesis");
    let (mut failed, mut total) = (Vec::new(), 0);
    for name in ServiceName::ALL {
        let schema = shop.service_url(name, "/openapi.json");
        let args = [
            "run",
            &schema,
            "--checks",
            CHECKS,
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            SEED,
            "--generation-database",
            "none",
            // One worker: schemathesis's workers are threads, and CPython before 3.13 can
            // fail compiling in several threads at once ("AST constructor recursion depth
            // mismatch", python/cpython#106905), which hypothesis does to describe lambdas.
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--no-color",
            "--header",
            &format!("{}: {admin_id}", shopmesh_platform::USER_ID_HEADER),
            "--header",
            &format!("{}: admin,customer", shopmesh_platform::USER_ROLES_HEADER),
        ];
        let started = Instant::now();
        let (st, dir) = (st.clone(), workdir.path().to_owned());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(st).args(args).current_dir(dir).output()
        })
        .await
        .expect("the schemathesis task")
        .expect("schemathesis runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The summary's line after `Test cases:`, e.g. "1032 generated, 1032 passed".
        let cases = text
            .lines()
            .skip_while(|l| l.trim() != "Test cases:")
            .nth(1)
            .unwrap_or("no summary")
            .trim()
            .to_owned();
        total += cases
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        eprintln!(
            "{name}: {} in {:.0?}; test cases: {cases}",
            out.status,
            started.elapsed()
        );
        if !out.status.success() {
            eprintln!("---- schemathesis on {name} ----\n{text}");
            failed.push(name);
        }
    }
    eprintln!("{total} test cases in all");
    shop.shutdown().await;
    assert!(
        failed.is_empty(),
        "these services do not conform to their documents: {failed:?} (schemathesis's output \
         is above)"
    );
}

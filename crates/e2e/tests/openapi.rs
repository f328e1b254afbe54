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
        let run = conform(
            &st,
            &shop.service_url(name, "/openapi.json"),
            &[
                format!("{}: {admin_id}", shopmesh_platform::USER_ID_HEADER),
                format!("{}: admin,customer", shopmesh_platform::USER_ROLES_HEADER),
            ],
            workdir.path(),
        )
        .await;
        total += run.cases;
        eprintln!("{name}: {}", run.summary);
        if !run.passed {
            eprintln!("---- schemathesis on {name} ----\n{}", run.output);
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

/// One schemathesis run's outcome.
struct Conformance {
    passed: bool,
    /// Test cases generated.
    cases: u64,
    /// Exit status, time and the summary's count line.
    summary: String,
    /// Everything schemathesis printed.
    output: String,
}

/// Runs schemathesis against the document at `schema`, sending `headers` with every request.
async fn conform(
    st: &str,
    schema: &str,
    headers: &[String],
    workdir: &std::path::Path,
) -> Conformance {
    let mut args: Vec<String> = [
        "run",
        schema,
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
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for h in headers {
        args.push("--header".into());
        args.push(h.clone());
    }
    let started = Instant::now();
    let (st, dir) = (st.to_owned(), workdir.to_owned());
    let out =
        tokio::task::spawn_blocking(move || Command::new(st).args(args).current_dir(dir).output())
            .await
            .expect("the schemathesis task")
            .expect("schemathesis runs");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary's line after `Test cases:`, e.g. "1032 generated, 1032 passed".
    let cases_line = output
        .lines()
        .skip_while(|l| l.trim() != "Test cases:")
        .nth(1)
        .unwrap_or("no summary")
        .trim()
        .to_owned();
    Conformance {
        passed: out.status.success(),
        cases: cases_line
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0),
        summary: format!(
            "{} in {:.0?}; test cases: {cases_line}",
            out.status,
            started.elapsed()
        ),
        output,
    }
}

/// The public document, as a client of the gateway reads it: every operation through the
/// gateway (composites included), with a signed-in customer's bearer token, sequences
/// following the documents' links.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs schemathesis: SHOPMESH_TEST_SCHEMATHESIS=1 cargo test -p shopmesh-e2e --test openapi -- --ignored"]
async fn the_public_document_conforms_through_the_gateway() {
    let st = schemathesis();
    let shop = TestShop::start().await;
    let (_, token) = shop.user().await;
    let workdir = tempfile::tempdir().expect("a working directory for schemathesis");
    let run = conform(
        &st,
        &shop.url("/openapi.json"),
        &[format!("authorization: Bearer {token}")],
        workdir.path(),
    )
    .await;
    eprintln!("gateway: {}", run.summary);
    shop.shutdown().await;
    assert!(
        run.passed,
        "the gateway does not answer as its public document says:\n{}",
        run.output
    );
    assert!(
        run.cases > 0,
        "schemathesis generated nothing:\n{}",
        run.output
    );
}

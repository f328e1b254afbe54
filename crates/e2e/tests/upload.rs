//! A 1 GiB upload streams through the gateway in bounded memory (its own test binary, so
//! that nothing else runs in the process while its memory is watched).

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use harness::Gw;
use tokio::net::TcpListener;

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_large_upload_streams_through_in_bounded_memory() {
    // An upstream that counts what it receives and keeps none of it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let mut stream = req.into_body().into_data_stream();
        let mut n: u64 = 0;
        while let Some(chunk) = stream.next().await {
            n += chunk.unwrap().len() as u64;
        }
        n.to_string()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = Gw::start(&format!(
        r#"
clusters:
  - {{ name: store, endpoints: ["http://{addr}"] }}
routes:
  - {{ name: upload, match: {{ prefix: /upload }}, cluster: store, max_body_bytes: 4294967296, timeout_ms: 300000 }}
  - {{ name: small, match: {{ prefix: / }}, cluster: store, max_body_bytes: 10 }}
"#
    ))
    .await;
    // Another route keeps its own, small, limit.
    let res = gw
        .http
        .post(format!("{}/form", gw.base))
        .body("12345678901")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    const TOTAL: u64 = 1024 * 1024 * 1024;
    let chunk = Bytes::from(vec![0x5a; 1024 * 1024]);
    let chunks = (TOTAL / chunk.len() as u64) as usize;
    let before = rss();
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let stream =
        futures::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let t = Instant::now();
    let res = gw
        .http
        .post(format!("{}/upload", gw.base))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), TOTAL.to_string());
    sampler.abort();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "1 GiB streamed in {:?}; resident memory grew by {} MiB at most",
        t.elapsed(),
        grew / (1024 * 1024)
    );
    // Streamed, the growth is a few MiB (the allocator sometimes keeps ~100 MiB of
    // freed buffers); held whole, it would be the full GiB.
    assert!(
        grew < 256 * 1024 * 1024,
        "memory grew by {grew} bytes while streaming {TOTAL}"
    );
    gw.stop().await;
}

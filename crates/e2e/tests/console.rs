//! The operations console in a real browser: Debian's chromium driven through chromedriver
//! (WebDriver), against a whole test shop or a standalone gateway.
//!
//! The browser is spoken to over W3C WebDriver's JSON protocol (a few commands, below).
//! These tests are ignored by default and fail, never skip, when chromium or chromedriver
//! is missing (`.ci/browser.sh` installs them and runs them):
//!
//! ```sh
//! cargo test -p shopmesh-e2e --test console -- --ignored --test-threads=1
//! ```
//!
//! `SHOPMESH_CHROMIUM` and `SHOPMESH_CHROMEDRIVER` name other binaries. Screenshots of
//! every view land in `target/tmp/console/<test>/`.

mod harness;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::Upstream;
use serde_json::{Value, json};
use shopmesh_gateway::server::Standalone;
use shopmesh_test_support::TestShop;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const XSS_NAME: &str = "<img src=x onerror=alert(1)>";

fn binary(var: &str, default: &str) -> PathBuf {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let found = if path.contains('/') {
        Some(PathBuf::from(&path)).filter(|p| p.exists())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(&path))
                .find(|p| p.exists())
        })
    };
    found.unwrap_or_else(|| {
        panic!(
            "`{path}` is not installed: the console's browser tests need Debian's chromium and \
             chromium-driver (.ci/browser.sh installs them), or {var} naming them"
        )
    })
}

/// A WebDriver session, spoken to as JSON over HTTP (W3C WebDriver, plus chromedriver's
/// browser log): the few commands these tests need.
struct Session {
    http: reqwest::Client,
    base: String,
}

/// A WebDriver error (`no such alert`, `javascript error`, …) with its message.
#[derive(Debug)]
struct WdError(String);

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Session {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.map_err(|e| WdError(e.to_string()))?;
        let ok = res.status().is_success();
        let v: Value = res.json().await.map_err(|e| WdError(e.to_string()))?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(WdError(format!(
                "{}: {}",
                v["value"]["error"].as_str().unwrap_or("error"),
                v["value"]["message"].as_str().unwrap_or_default()
            )))
        }
    }

    async fn goto(&self, url: &str) -> Result<(), WdError> {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    async fn execute(&self, script: &str) -> Result<Value, WdError> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self.call("GET", "/screenshot", None).await.unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    /// The element `css` names, clicked as a user would (scrolled to, the event dispatched
    /// by the page's own handlers).
    async fn click(&self, css: &str) {
        let script = format!(
            "const e = document.querySelector({0}); if (!e) return false; \
             e.scrollIntoView(); e.click(); return true;",
            json!(css)
        );
        assert_eq!(
            self.execute(&script).await.unwrap(),
            json!(true),
            "click {css}"
        );
    }

    async fn type_into(&self, css: &str, text: &str) {
        let script = format!(
            "const e = document.querySelector({0}); if (!e) return false; \
             e.value = {1}; e.dispatchEvent(new Event('input')); return true;",
            json!(css),
            json!(text)
        );
        assert_eq!(
            self.execute(&script).await.unwrap(),
            json!(true),
            "type into {css}"
        );
    }

    async fn text(&self, css: &str) -> String {
        let script = format!(
            "return document.querySelector({0}).textContent;",
            json!(css)
        );
        let v = self
            .execute(&script)
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn alert_text(&self) -> Result<Value, WdError> {
        self.call("GET", "/alert/text", None).await
    }

    async fn window_size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await
        .unwrap();
    }

    /// chromedriver's browser log (the page's console and network errors).
    async fn browser_log(&self) -> Value {
        self.call("POST", "/se/log", Some(json!({ "type": "browser" })))
            .await
            .unwrap()
    }
}

/// A headless chromium behind its chromedriver, and where its screenshots go.
struct Browser {
    client: Session,
    driver: Child,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Drop for Browser {
    /// Ends the session first (chromedriver then quits its browser; killing the driver
    /// alone would leave the browser running), even when the test panicked.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let (addr, path) = self
            .client
            .base
            .strip_prefix("http://")
            .and_then(|r| r.split_once('/'))
            .map(|(a, p)| (a.to_owned(), format!("/{p}")))
            .unwrap_or_default();
        if let Ok(mut c) = std::net::TcpStream::connect(&addr) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                c,
                "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = c.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(test: &str) -> Self {
        let chromium = binary("SHOPMESH_CHROMIUM", "chromium");
        let chromedriver = binary("SHOPMESH_CHROMEDRIVER", "chromedriver");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:loggingPrefs": { "browser": "ALL" },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let created = loop {
            let res = http
                .post(format!("{webdriver}/session"))
                .json(&json!({ "capabilities": { "alwaysMatch": caps } }))
                .send()
                .await;
            match res {
                Ok(r) => break r.json::<Value>().await.unwrap(),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from {}: {e}", chromedriver.display()),
            }
        };
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"));
        let client = Session {
            http,
            base: format!("{webdriver}/session/{id}"),
        };
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("console")
            .join(test);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            driver,
            _profile: profile,
            shots,
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script)
            .await
            .unwrap_or_else(|e| panic!("script failed ({e}): {script}"))
    }

    /// Waits until `script` returns true.
    async fn until(&self, what: &str, within: Duration, script: &str) -> Duration {
        let start = Instant::now();
        loop {
            if self.js(script).await == Value::Bool(true) {
                return start.elapsed();
            }
            if start.elapsed() > within {
                let _ = self
                    .shot(&format!("failed-{}", what.replace(' ', "-")))
                    .await;
                panic!("{what}: not within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn view(&self, id: &str) {
        self.js(&format!("location.hash = '#{id}'; return true;"))
            .await;
        self.until(
            &format!("view {id}"),
            Duration::from_secs(5),
            &format!("return document.body.dataset.view === '{id}';"),
        )
        .await;
    }

    async fn shot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    async fn text(&self, css: &str) -> String {
        self.client.text(css).await
    }

    /// No error in the console (but the network failures `expected`), no request to another
    /// origin, no dialog open.
    async fn assert_clean(&self, expected: &[&str]) {
        let logs = self.client.browser_log().await;
        let severe: Vec<&Value> = logs
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["level"] == "SEVERE")
            .filter(|l| {
                let m = l["message"].as_str().unwrap_or_default();
                !(l["source"] == "network" && expected.iter().any(|e| m.contains(e)))
            })
            .collect();
        assert!(severe.is_empty(), "console errors: {severe:#?}");
        let foreign = self
            .js(
                "return performance.getEntriesByType('resource').map(e => e.name)
                   .filter(n => !n.startsWith(location.origin + '/'));",
            )
            .await;
        assert_eq!(foreign, json!([]), "requests to another origin");
        assert!(
            self.client.alert_text().await.is_err(),
            "a dialog is open: some script ran"
        );
    }
}

async fn wait_snapshots(b: &Browser, n: u64) {
    b.until(
        &format!("snapshot {n}"),
        Duration::from_secs(10),
        &format!("return Number(document.body.dataset.snapshots || 0) >= {n};"),
    )
    .await;
}

const VIEWS: [&str; 8] = [
    "overview",
    "routes",
    "topology",
    "composites",
    "orders",
    "messaging",
    "config",
    "feed",
];

/// A standalone gateway on a file of its own (with its admin section).
struct Gateway {
    inner: Option<Standalone>,
    dir: tempfile::TempDir,
    base: String,
    admin: String,
}

impl Gateway {
    async fn start(yaml: &str, admin: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, format!("listen: 127.0.0.1:0\n{admin}\n{yaml}")).unwrap();
        let inner = Standalone::start(path, Duration::from_millis(50))
            .await
            .expect("the gateway starts");
        Gateway {
            base: format!("http://{}", inner.addr),
            admin: format!("http://{}", inner.admin.unwrap()),
            inner: Some(inner),
            dir,
        }
    }

    fn rewrite(&self, text: &str) {
        let path = self.dir.path().join("gateway.yaml");
        let tmp = self.dir.path().join("gateway.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    fn version(&self) -> u64 {
        self.inner.as_ref().unwrap().gateway.runtime().version
    }

    async fn stop(mut self) {
        if let Some(s) = self.inner.take() {
            s.shutdown().await;
        }
    }
}

fn breaker_config(up: &Upstream) -> String {
    format!(
        r#"
clusters:
  - name: up
    endpoints: ["{}"]
    circuit_breaker: {{ consecutive_failures: 3, open_ms: 1500, half_open_requests: 1 }}
routes:
  - {{ name: all, match: {{ prefix: / }}, cluster: up }}
"#,
        up.url()
    )
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn a_breaker_chip_shows_open_within_two_seconds_then_closes() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&breaker_config(&up), "admin: { listen: 127.0.0.1:0 }").await;
    let http = reqwest::Client::new();
    for _ in 0..20 {
        http.get(format!("{}/warm", gw.base)).send().await.unwrap();
    }
    let b = Browser::start("breaker").await;
    b.goto(&format!("{}/console#routes", gw.admin)).await;
    wait_snapshots(&b, 1).await;
    b.view("routes").await;
    b.until(
        "closed chip",
        Duration::from_secs(5),
        "return !!document.querySelector('.chip.breaker[data-state=\"closed\"]');",
    )
    .await;
    b.shot("routes-closed").await;
    // The endpoint fails: three 5xx in a row open its breaker.
    up.status.store(503, Ordering::SeqCst);
    for _ in 0..3 {
        http.get(format!("{}/fail", gw.base)).send().await.unwrap();
    }
    let took = b
        .until(
            "open chip",
            Duration::from_secs(2),
            "return !!document.querySelector('.chip.breaker[data-state=\"open\"]');",
        )
        .await;
    eprintln!("breaker chip open {took:?} after the trip");
    b.shot("routes-open").await;
    // Open the route: the endpoint's breaker, its time in state and trips.
    b.client.click("#routes-table button.link").await;
    b.until(
        "endpoint detail",
        Duration::from_secs(3),
        "return [...document.querySelectorAll('tr.detail .endpoints td')].some(td => td.textContent.includes('open ·'));",
    )
    .await;
    b.shot("routes-endpoint").await;
    // It recovers: after open_ms a probe succeeds and the breaker closes.
    up.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for _ in 0..3 {
        http.get(format!("{}/ok", gw.base)).send().await.unwrap();
    }
    b.until(
        "closed again",
        Duration::from_secs(3),
        "return !!document.querySelector('.chip.breaker[data-state=\"closed\"]') && !document.querySelector('.chip.breaker[data-state=\"open\"]');",
    )
    .await;
    // The feed has both changes.
    b.view("feed").await;
    b.until(
        "feed entries",
        Duration::from_secs(3),
        "return document.querySelectorAll('#feed li[data-kind=\"breaker\"]').length >= 2;",
    )
    .await;
    b.shot("feed").await;
    b.view("topology").await;
    b.shot("topology").await;
    b.assert_clean(&[]).await;
    gw.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn a_mirror_shows_its_observed_rate_and_a_composite_its_timeouts_apart_from_fallbacks() {
    let up = Upstream::start("up").await;
    let shadow = Upstream::start("shadow").await;
    let bad = Upstream::start("bad").await;
    bad.status.store(500, Ordering::SeqCst);
    // `slow` waits 300 ms: past its part's 100 ms timeout. `broken` answers 500 at once.
    let yaml = format!(
        r#"
clusters:
  - {{ name: up, endpoints: ["{up}"] }}
  - {{ name: shadow, endpoints: ["{shadow}"] }}
  - {{ name: bad, endpoints: ["{bad}"] }}
routes:
  - name: page
    match: {{ template: "/page/{{id}}" }}
    aggregate:
      parts:
        - {{ name: main, cluster: up, path: "/main/{{path.id}}", timeout_ms: 2000 }}
        - {{ name: slow, cluster: up, path: /slow, required: false, timeout_ms: 100 }}
        - {{ name: broken, cluster: bad, path: /broken, required: false, timeout_ms: 2000 }}
  - name: mirrored
    match: {{ prefix: / }}
    cluster: up
    mirror: {{ cluster: shadow, percent: 50 }}
"#,
        up = up.url(),
        shadow = shadow.url(),
        bad = bad.url()
    );
    let gw = Gateway::start(&yaml, "admin: { listen: 127.0.0.1:0 }").await;
    let b = Browser::start("mirror").await;
    b.goto(&format!("{}/console#routes", gw.admin)).await;
    wait_snapshots(&b, 1).await;
    // A reading before the traffic, so that the window holds all of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let http = reqwest::Client::new();
    const N: usize = 400;
    for n in 0..N {
        let res = http.get(format!("{}/m/{n}", gw.base)).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    for n in 0..10 {
        let res = http
            .get(format!("{}/page/{n}", gw.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-aggregate-failed"], "slow,broken");
    }
    // The shadow got about half of the requests; the console shows the share it observed.
    let copies = shadow
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.shadow)
        .count();
    b.view("routes").await;
    b.js("document.querySelector('#routes-table tbody[data-key=\"mirrored\"] button.link').click(); return true;")
        .await;
    b.until(
        "the mirror's observed rate",
        Duration::from_secs(5),
        "const row = document.querySelector('#mirror-mirrored tbody tr');
         return !!row && row.dataset.drawn !== '' && Number(row.dataset.drawn) > 0;",
    )
    .await;
    // Copies finish after their requests: wait until the console has counted them all.
    let expected = copies as f64 / N as f64;
    b.until(
        "every copy counted",
        Duration::from_secs(5),
        &format!(
            "const row = document.querySelector('#mirror-mirrored tbody tr');
             return Math.abs(Number(row.dataset.drawn) - {expected}) < 0.02;"
        ),
    )
    .await;
    assert!(
        (0.35..=0.65).contains(&expected),
        "a 50 % mirror copied {copies} of {N}"
    );
    assert_eq!(
        b.js("return document.querySelector('#mirror-mirrored tbody tr').dataset.configured;")
            .await,
        json!("0.5")
    );
    b.shot("routes-mirror").await;
    // Composites: the slow part's fallbacks are timeouts, the broken part's are not.
    b.view("composites").await;
    let cell = |part: &str, column: &str| {
        format!(
            "(() => {{
               const table = [...document.querySelectorAll('#composites .composite')]
                 .find(c => c.querySelector('h3').textContent === 'page').querySelector('table');
               const col = [...table.querySelectorAll('th')].map(th => th.textContent).indexOf('{column}');
               const row = table.querySelector('tbody tr[data-key=\"{part}\"]');
               return Number(row.children[col].textContent);
             }})()"
        )
    };
    b.until(
        "timeouts and fallbacks",
        Duration::from_secs(5),
        &format!(
            "return {} === 10 && {} === 10 && {} === 0 && {} === 10 && {} === 0;",
            cell("slow", "timeouts"),
            cell("slow", "fallbacks"),
            cell("broken", "timeouts"),
            cell("broken", "fallbacks"),
            cell("main", "timeouts"),
        ),
    )
    .await;
    b.shot("composites-timeouts").await;
    b.assert_clean(&[]).await;
    gw.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn reloads_are_listed_and_a_refused_one_is_shown_while_the_old_version_serves() {
    let up = Upstream::start("up").await;
    let admin = "admin: { listen: 127.0.0.1:0 }";
    let routes = |first: &str| {
        format!(
            "clusters:\n  - {{ name: up, endpoints: [\"{}\"] }}\nroutes:\n{first}  - {{ name: all, match: {{ prefix: / }}, cluster: up }}\n",
            up.url()
        )
    };
    let text = |yaml: String| format!("listen: 127.0.0.1:0\n{admin}\n{yaml}");
    let gw = Gateway::start(&routes(""), admin).await;
    let b = Browser::start("reload").await;
    b.goto(&format!("{}/console#config", gw.admin)).await;
    wait_snapshots(&b, 1).await;
    b.view("config").await;
    b.until(
        "initial row",
        Duration::from_secs(3),
        "return document.querySelectorAll('#reload-history tr').length === 1;",
    )
    .await;
    // A change on disk: a new row, applied, saying what changed.
    gw.rewrite(&text(routes(
        "  - { name: extra, match: { prefix: /extra }, cluster: up }\n",
    )));
    b.until(
        "applied row",
        Duration::from_secs(5),
        "const r = document.querySelector('#reload-history tr');
         return document.querySelectorAll('#reload-history tr').length === 2
           && r.dataset.outcome === 'ok' && r.textContent.includes('route extra: added');",
    )
    .await;
    assert_eq!(gw.version(), 2);
    // An invalid one: refused, the error shown, version 2 serving on.
    gw.rewrite(&text(routes(
        "  - { name: broken, match: { prefix: /b }, cluster: nowhere }\n",
    )));
    b.until(
        "refused row",
        Duration::from_secs(5),
        "const r = document.querySelector('#reload-history tr');
         const e = document.getElementById('config-error');
         return document.querySelectorAll('#reload-history tr').length === 3
           && r.dataset.outcome === 'error' && !e.hidden && e.textContent.includes('nowhere');",
    )
    .await;
    assert_eq!(gw.version(), 2, "the old version still serves");
    let res = reqwest::get(format!("{}/extra", gw.base)).await.unwrap();
    assert_eq!(res.status(), 200, "served by version 2");
    assert!(b.text("#config-version").await.contains("v2"));
    b.shot("config").await;
    // Validating a candidate changes nothing.
    b.client
        .type_into(
            "#candidate",
            "clusters: []\nroutes:\n  - { name: x, match: { prefix: / }, cluster: gone }\n",
        )
        .await;
    b.client.click("#validate").await;
    b.until(
        "validation refused",
        Duration::from_secs(3),
        "const o = document.getElementById('validate-outcome');
         return o.dataset.outcome === 'error' && o.textContent.includes('gone');",
    )
    .await;
    assert_eq!(gw.version(), 2);
    b.view("feed").await;
    b.until(
        "reload events",
        Duration::from_secs(3),
        "return document.querySelectorAll('#feed li[data-kind=\"reload\"]').length >= 2;",
    )
    .await;
    b.assert_clean(&[]).await;
    gw.stop().await;
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn with_an_admin_token_every_console_path_needs_it() {
    let up = Upstream::start("up").await;
    let token = "t0ken-for-the-console";
    let gw = Gateway::start(
        &format!(
            "clusters:\n  - {{ name: up, endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, cluster: up }}\n",
            up.url()
        ),
        &format!("admin: {{ listen: 127.0.0.1:0, token: {token} }}"),
    )
    .await;
    let paths = [
        ("GET", "/console"),
        ("GET", "/console/"),
        ("GET", "/console/assets/app.js"),
        ("GET", "/console/assets/console.css"),
        ("GET", "/console/assets/views/routes.js"),
        ("GET", "/console/events"),
        ("POST", "/console/api/config/reload"),
        ("POST", "/console/api/config/validate"),
    ];
    token_needed(&gw.admin, token, &paths, &["/healthz"]).await;
    let b = Browser::start("token").await;
    browser_needs_token(&b, &gw.admin, token).await;
    b.shot("overview-with-token").await;
    gw.stop().await;

    // The same for the whole shop's admin port (`shopmesh up --admin-token`): the console
    // with the shop's own views and actions, the dead letters, the gateway's routes, metrics.
    let token = "t0ken-for-the-shop";
    let shop = TestShop::start_with(|c| c.admin_token = Some(token.into())).await;
    let paths = [
        ("GET", "/console"),
        ("GET", "/console/"),
        ("GET", "/console/assets/app.js"),
        ("GET", "/console/assets/dom.js"),
        ("GET", "/console/assets/views/orders.js"),
        ("GET", "/console/events"),
        ("GET", "/console/api/orders"),
        (
            "GET",
            "/console/api/orders/00000000-0000-0000-0000-000000000000",
        ),
        (
            "GET",
            "/console/api/orders/00000000-0000-0000-0000-000000000000/messages",
        ),
        ("GET", "/console/api/dead-letters/x"),
        ("POST", "/console/api/dead-letters/x/replay"),
        ("POST", "/console/api/config/validate"),
        ("GET", "/dlq"),
        ("GET", "/dlq/x"),
        ("DELETE", "/dlq/x"),
        ("POST", "/dlq/x/replay"),
        ("GET", "/routes"),
        ("GET", "/clusters"),
        ("GET", "/config"),
        ("GET", "/metrics"),
    ];
    token_needed(&shop.admin, token, &paths, &["/healthz", "/readyz"]).await;
    browser_needs_token(&b, &shop.admin, token).await;
    // The shop's views are there once in.
    b.view("orders").await;
    b.shot("shop-with-token").await;
    shop.shutdown().await;
}

/// Every one of `paths` on `admin` is 401 without `token` (asking a browser for it on the
/// console) and with a wrong one, and is served with it; the `open` probes need none.
async fn token_needed(admin: &str, token: &str, paths: &[(&str, &str)], open: &[&str]) {
    let http = reqwest::Client::new();
    for (method, path) in paths {
        let req = |auth: Option<&str>| {
            let mut r = http
                .request(method.parse().unwrap(), format!("{admin}{path}"))
                .header("x-shopmesh-console", "1");
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.send()
        };
        let res = req(None).await.unwrap();
        assert_eq!(res.status(), 401, "{method} {path} without the token");
        if path.starts_with("/console") {
            assert!(
                res.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic"),
                "the browser asks for it"
            );
        }
        let res = req(Some("Bearer wrong")).await.unwrap();
        assert_eq!(res.status(), 401, "{method} {path} with a wrong token");
        let res = req(Some(&format!("Bearer {token}"))).await.unwrap();
        assert_ne!(res.status(), 401, "{method} {path} with the token");
        if *path == "/console/events" {
            assert_eq!(res.status(), 200);
        }
    }
    for path in open {
        let res = http.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path} is a probe: no token");
    }
}

/// In a browser: refused without credentials, served with them (the token as the password
/// of Basic credentials, as a browser's prompt would send it).
async fn browser_needs_token(b: &Browser, admin: &str, token: &str) {
    let admin = admin.trim_start_matches("http://");
    b.goto(&format!("http://{admin}/console")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.js("return document.body ? (document.body.dataset.snapshots || 'none') : 'none';")
            .await,
        json!("none"),
        "nothing served without credentials"
    );
    b.goto(&format!("http://console:{token}@{admin}/console"))
        .await;
    wait_snapshots(b, 1).await;
    b.until(
        "live",
        Duration::from_secs(5),
        "return document.getElementById('conn').dataset.state === 'live';",
    )
    .await;
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn a_page_of_another_origin_cannot_act() {
    let up = Upstream::start("up").await;
    let admin = "admin: { listen: 127.0.0.1:0 }";
    let yaml = format!(
        "clusters:\n  - {{ name: up, endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: all, match: {{ prefix: / }}, cluster: up }}\n",
        up.url()
    );
    let gw = Gateway::start(&yaml, admin).await;
    assert_eq!(gw.version(), 1);
    // Another origin's page: simple form posts (no custom header can be set) to the
    // console's reload, and to the admin API's.
    let evil = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    let target = gw.admin.clone();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/{which}",
            axum::routing::get(
                move |axum::extract::Path(which): axum::extract::Path<String>| {
                    let target = target.clone();
                    async move {
                        let action = if which == "console" {
                            format!("{target}/console/api/config/reload")
                        } else {
                            format!("{target}/reload")
                        };
                        axum::response::Html(format!(
                            "<form id=f method=post enctype=text/plain action=\"{action}\">\
                         <input name=x value=1></form>\
                         <script>document.getElementById('f').submit()</script>"
                        ))
                    }
                },
            ),
        );
        axum::serve(evil, app).await.unwrap();
    });
    let b = Browser::start("cross-origin").await;
    for which in ["console", "admin"] {
        b.goto(&format!("http://{evil_addr}/{which}")).await;
        b.until(
            &format!("{which} form answered"),
            Duration::from_secs(5),
            "return !!document.body && document.body.innerText.includes('another origin');",
        )
        .await;
    }
    assert_eq!(gw.version(), 1, "nothing was reloaded");
    let history = gw.inner.as_ref().unwrap().gateway.reloads();
    assert_eq!(
        history.len(),
        1,
        "no reload was even attempted: {history:?}"
    );
    gw.stop().await;
}

/// A TCP relay in front of the admin port whose connections the test can cut.
async fn relay(to: std::net::SocketAddr) -> (String, Arc<tokio::sync::Notify>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cut = Arc::new(tokio::sync::Notify::new());
    let c = cut.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = l.accept().await.unwrap();
            let cut = c.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.notified() => {
                        let _ = inbound.shutdown().await;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), cut)
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn a_cut_stream_reconnects_with_a_fresh_snapshot() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&breaker_config(&up), "admin: { listen: 127.0.0.1:0 }").await;
    let admin: std::net::SocketAddr = gw.admin.trim_start_matches("http://").parse().unwrap();
    let (via, cut) = relay(admin).await;
    let b = Browser::start("reconnect").await;
    b.goto(&format!("{via}/console#routes")).await;
    wait_snapshots(&b, 1).await;
    b.until(
        "live",
        Duration::from_secs(5),
        "return document.getElementById('conn').dataset.state === 'live';",
    )
    .await;
    // What changes while the stream is down must be there after it comes back.
    cut.notify_waiters();
    up.status.store(503, Ordering::SeqCst);
    let http = reqwest::Client::new();
    for _ in 0..3 {
        http.get(format!("{}/x", gw.base)).send().await.unwrap();
    }
    wait_snapshots(&b, 2).await;
    b.until(
        "live again, with the open breaker",
        Duration::from_secs(5),
        "return document.getElementById('conn').dataset.state === 'live'
           && !!document.querySelector('.chip.breaker[data-state=\"open\"]');",
    )
    .await;
    // The cut itself is the one error.
    b.assert_clean(&[
        "/console/events - Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING",
    ])
    .await;
    gw.stop().await;
}

/// Registers a user named `name` and logs in: (id, token).
async fn user_named(shop: &TestShop, name: &str) -> (String, String) {
    let email = format!("{}@example.test", uuid::Uuid::new_v4().simple());
    let res = shop
        .http
        .post(shop.url("/api/users"))
        .json(&json!({"email": email, "password": "correct horse battery", "name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, shop.login(&email, "correct horse battery").await)
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn a_dead_letter_is_replayed_from_the_console_and_user_data_stays_text() {
    let shop = TestShop::start().await;
    let (_, token) = user_named(&shop, XSS_NAME).await;
    // Some traffic for the charts.
    for _ in 0..30 {
        shop.get("/api/products?limit=2", None).await;
    }
    let b = Browser::start("shop").await;
    b.goto(&format!("{}/console", shop.admin)).await;
    wait_snapshots(&b, 1).await;
    // Inventory cannot reserve stock (its table is gone): OrderPlaced is dead-lettered
    // after its retries.
    let inventory =
        shopmesh_platform::db::Db::open(&shop.storage.storage.for_service("inventory"), 1)
            .await
            .unwrap();
    sqlx::query("ALTER TABLE reservations RENAME TO reservations_parked")
        .execute(&inventory.pool)
        .await
        .unwrap();
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .json(&json!({"items": [{"product_id": shop.product(1), "quantity": 1}], "card": "4242424242424242"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let order = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.view("messaging").await;
    b.until(
        "the dead letter",
        Duration::from_secs(20),
        "return !!document.querySelector('#dead-letters tr.letter');",
    )
    .await;
    // The customer's name, as text.
    b.until(
        "the name as text",
        Duration::from_secs(3),
        &format!(
            "return [...document.querySelectorAll('#dead-letters tr.letter td')].some(td => td.textContent === {});",
            json!(XSS_NAME)
        ),
    )
    .await;
    // Peek: the payload, as text, the letter untouched.
    b.client.click("#dead-letters button.peek").await;
    b.until(
        "the payload",
        Duration::from_secs(3),
        &format!(
            "return document.getElementById('peek-payload').textContent.includes({});",
            json!(order)
        ),
    )
    .await;
    // Each subscription's figures, what it holds now among them.
    b.until(
        "the consumers' in-flight",
        Duration::from_secs(5),
        "const head = [...document.querySelectorAll('#view-messaging thead')[0].querySelectorAll('th')]
            .map(th => th.textContent);
         const col = head.indexOf('in flight');
         const row = document.querySelector('#consumers tr[data-key=\"inventory\"]');
         return col > 0 && !!row && /^[0-9]+$/.test(row.children[col].textContent);",
    )
    .await;
    b.shot("messaging").await;
    // The order's timeline: OrderPlaced published, each failed delivery to inventory, the
    // dead letter.
    b.view("orders").await;
    b.until(
        "the order listed",
        Duration::from_secs(5),
        &format!(
            "return !!document.querySelector('#orders-rows tr[data-key={}] button');",
            json!(order)
        ),
    )
    .await;
    b.js(&format!(
        "document.querySelector('#orders-rows tr[data-key={}] button').click(); return true;",
        json!(order)
    ))
    .await;
    // Each timeline entry as `kind:step-or-event:consumer`, in the order shown.
    const ENTRIES: &str = "return [...document.querySelectorAll('#order-timeline li')]
        .map(li => `${li.dataset.kind}:${li.dataset.step || li.dataset.event}:${li.dataset.consumer || ''}`);";
    b.until(
        "the dead letter in the timeline",
        Duration::from_secs(5),
        "return !!document.querySelector('#order-timeline li[data-event=\"dead_lettered\"][data-consumer=\"inventory\"]')
            && !!document.querySelector('#order-timeline li[data-event=\"dead_letter\"]');",
    )
    .await;
    let before: Vec<String> = serde_json::from_value(b.js(ENTRIES).await).unwrap();
    let at = |entries: &[String], what: &str| {
        entries
            .iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("no `{what}` in the timeline: {entries:#?}"))
    };
    let retries = before
        .iter()
        .filter(|e| *e == "message:retry:inventory")
        .count();
    // Five deliveries: four retries, then the dead letter.
    assert_eq!(retries, 4, "each failed delivery is shown: {before:#?}");
    assert!(at(&before, "step:placed:") < at(&before, "message:published:"));
    assert!(at(&before, "message:published:") < at(&before, "message:retry:inventory"));
    assert!(
        before
            .iter()
            .rposition(|e| e == "message:retry:inventory")
            .unwrap()
            < at(&before, "message:dead_lettered:inventory")
    );
    assert!(
        !before.iter().any(|e| e == "step:confirmed:"),
        "not confirmed yet: {before:#?}"
    );
    b.shot("order-timeline-dead-lettered").await;
    // Inventory can work again; replay from the console's messaging view (its button,
    // clicked while the order's timeline stays on screen: the timeline appends live).
    sqlx::query("ALTER TABLE reservations_parked RENAME TO reservations")
        .execute(&inventory.pool)
        .await
        .unwrap();
    b.js("document.querySelector('#dead-letters button.replay').click(); return true;")
        .await;
    b.until(
        "replayed",
        Duration::from_secs(5),
        "return !!document.querySelector('#replay-outcomes li[data-outcome=\"ok\"]');",
    )
    .await;
    // The order's timeline shows it completed, without another click.
    b.until(
        "confirmed in the timeline",
        Duration::from_secs(15),
        "return [...document.querySelectorAll('#order-timeline li')].some(li => li.dataset.step === 'confirmed');",
    )
    .await;
    b.until(
        "the stock committed",
        Duration::from_secs(10),
        "return [...document.querySelectorAll('#order-timeline li')].filter(li =>
            li.dataset.event === 'applied' && li.dataset.consumer === 'inventory').length >= 2;",
    )
    .await;
    let after: Vec<String> = serde_json::from_value(b.js(ENTRIES).await).unwrap();
    assert!(
        at(&after, "message:dead_lettered:inventory") < at(&after, "message:replayed:inventory")
    );
    assert!(at(&after, "message:replayed:inventory") < at(&after, "message:applied:inventory"));
    assert!(at(&after, "message:applied:inventory") < at(&after, "step:stock_reserved:"));
    assert!(at(&after, "message:applied:payments") < at(&after, "step:confirmed:"));
    assert!(
        !after.iter().any(|e| e == "message:dead_letter:"),
        "the replayed dead letter is no longer kept: {after:#?}"
    );
    b.shot("order-timeline").await;
    b.view("messaging").await;
    b.until(
        "the group gone",
        Duration::from_secs(5),
        "return !document.querySelector('#dead-letters tr.letter');",
    )
    .await;
    b.view("orders").await;
    assert!(
        b.js(&format!(
            "return [...document.querySelectorAll('#orders-rows td')].some(td => td.textContent === {});",
            json!(XSS_NAME)
        ))
        .await
            == json!(true),
        "the name in the orders view, as text"
    );
    b.shot("orders").await;
    // The feed names the dead letter and its customer, as text.
    b.view("feed").await;
    b.until(
        "the dead letter in the feed",
        Duration::from_secs(3),
        &format!(
            "return [...document.querySelectorAll('#feed li[data-kind=\"dead_letter\"] .user')].some(s => s.textContent === 'user ' + {});",
            json!(XSS_NAME)
        ),
    )
    .await;
    b.shot("feed").await;
    // Traffic on the composites, the lists and a missing page while the views are shot.
    let traffic = {
        let (http, base) = (shop.http.clone(), shop.base.clone());
        let ids: Vec<String> = (1..=7).map(|n| shop.product(n)).collect();
        tokio::spawn(async move {
            for n in 0.. {
                let id = &ids[n % ids.len()];
                let _ = http.get(format!("{base}/api/products/{id}")).send().await;
                let _ = http
                    .get(format!("{base}/api/products?limit=5"))
                    .send()
                    .await;
                if n % 10 == 0 {
                    let _ = http
                        .get(format!("{base}/api/products/missing"))
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // Every view, each with a screenshot; nothing ran, nothing failed.
    for v in VIEWS {
        b.view(v).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.shot(v).await;
    }
    traffic.abort();
    assert_eq!(
        b.js("return document.querySelectorAll('img').length;")
            .await,
        json!(0),
        "no markup from data"
    );
    b.assert_clean(&[]).await;
    // A narrow screen.
    b.client.window_size(400, 900).await;
    b.view("overview").await;
    b.shot("overview-narrow").await;
    assert_eq!(
        b.js("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
            .await,
        json!(true),
        "no sideways scrolling on a narrow screen"
    );
    shop.shutdown().await;
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn the_console_loads_clean_with_nothing_from_another_origin() {
    let shop = TestShop::start().await;
    let b = Browser::start("clean").await;
    b.goto(&format!("{}/console", shop.admin)).await;
    wait_snapshots(&b, 1).await;
    // Load the charts' data and go through every view.
    for _ in 0..20 {
        shop.get("/api/products?limit=1", None).await;
    }
    for v in VIEWS {
        b.view(v).await;
    }
    b.view("overview").await;
    b.until(
        "requests counted",
        Duration::from_secs(5),
        "return document.getElementById('ov-rps').textContent !== '–';",
    )
    .await;
    let csp = reqwest::get(format!("{}/console", shop.admin))
        .await
        .unwrap()
        .headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    b.assert_clean(&[]).await;
    shop.shutdown().await;
}

/// The pattern lab's report renders in a real browser (issue 23): a lab run at the smoke
/// scale (the proxy experiments), its HTML page opened from its file: no console error,
/// nothing loaded, no script run, one drawn chart (SVG with content) per chart of the report,
/// a table row per finding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: .ci/browser.sh"]
async fn the_pattern_labs_report_renders_without_errors() {
    let opts = shopmesh_lab::Options {
        scale: shopmesh_lab::Scale::smoke(),
        only: vec![shopmesh_lab::Group::Proxy],
        backend: shopmesh_lab::Backend::default(),
        progress: false,
        shopmesh: None,
    };
    let report = shopmesh_lab::run(&opts).await.expect("the lab runs");
    let charts: usize = report.findings.iter().map(|f| f.charts.len()).sum();
    assert!(charts > 0, "the proxy experiments draw charts");
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("lab.html");
    std::fs::write(&page, shopmesh_lab::html::render(&report).unwrap()).unwrap();

    let b = Browser::start("lab").await;
    b.goto(&format!("file://{}", page.display())).await;
    b.until(
        "the report",
        Duration::from_secs(10),
        "return document.readyState === 'complete';",
    )
    .await;
    let drawn = b
        .js("return [...document.querySelectorAll('svg')]
               .filter(s => s.getBoundingClientRect().width > 0 && s.querySelectorAll('path, line, polyline, circle, rect').length > 0)
               .length;")
        .await;
    assert_eq!(drawn, json!(charts), "every chart drawn, with content");
    let scripts = b.js("return document.scripts.length;").await;
    assert_eq!(scripts, json!(0), "the page carries no script");
    let text = b.js("return document.body.innerText;").await;
    for f in &report.findings {
        assert!(
            text.as_str().unwrap().contains(f.id),
            "finding {} is on the page",
            f.id
        );
    }
    b.shot("lab-report").await;
    b.assert_clean(&[]).await;
}

//! Graceful shutdown: a request in flight when the stop signal comes still gets its answer,
//! through a service and through the gateway; new connections are refused.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use shopmesh_gateway::config::{ClusterConfig, RouteConfig};
use shopmesh_gateway::{Gateway, GatewayConfig};
use shopmesh_platform::serve::Server;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service whose only route answers after `delay`.
async fn slow_service(delay: Duration, token: CancellationToken) -> SocketAddr {
    let routes = Router::new().route(
        "/slow",
        get(move || async move {
            tokio::time::sleep(delay).await;
            "done"
        }),
    );
    let app = shopmesh_platform::serve::stack("slow", routes, 1024);
    let server = Server::bind("slow", "127.0.0.1:0".parse().unwrap(), app)
        .await
        .unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.run(token, Duration::from_secs(5)));
    addr
}

#[tokio::test]
async fn a_service_finishes_in_flight_requests() {
    let token = CancellationToken::new();
    let addr = slow_service(Duration::from_millis(400), token.clone()).await;
    let http = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get(format!("http://{addr}/slow")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    token.cancel();
    let res = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        http.get(format!("http://{addr}/slow"))
            .send()
            .await
            .is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn the_gateway_finishes_in_flight_requests() {
    let upstream_token = CancellationToken::new();
    let upstream = slow_service(Duration::from_millis(400), upstream_token.clone()).await;
    let gateway = Gateway::new(GatewayConfig::new(
        vec![ClusterConfig::new(
            "slow",
            vec![format!("http://{upstream}")],
        )],
        vec![RouteConfig::prefix("slow", "/slow", "slow")],
    ))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let served = tokio::spawn(shopmesh_gateway::server::serve(
        listener,
        gateway,
        token.clone(),
        Duration::from_secs(5),
    ));
    let http = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get(format!("http://{addr}/slow")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    token.cancel();
    let res = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the gateway stops once drained")
        .unwrap();
    assert!(
        http.get(format!("http://{addr}/slow"))
            .send()
            .await
            .is_err(),
        "still accepting"
    );
    upstream_token.cancel();
}

//! Many token requests at once, through hyper's client, retried like an SDK.
use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use imds_tests::BurstReport;

const ATTEMPTS: usize = 8;
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// How many requests, how fast, and over which connections.
pub(crate) struct Shape {
    pub(crate) count: usize,
    pub(crate) concurrency: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) keep_alive: bool,
}

pub(crate) async fn run(addr: SocketAddrV4, shape: Shape, queries: &[String]) -> BurstReport {
    let Shape { count, concurrency, rate, keep_alive } = shape;
    // Without keep-alive, a new connection per request, as curl and a fresh SDK process
    // make; with it, a pool, as a long-lived SDK client keeps (its connections idle for
    // less than the agent's 5 s idle timeout).
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(if keep_alive { usize::MAX } else { 0 })
        .pool_idle_timeout(Duration::from_secs(4))
        .build_http();
    let report = Arc::new(Mutex::new(BurstReport { requests: count, ..BurstReport::default() }));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        if let Some(rate) = rate {
            tokio::time::sleep_until((started + Duration::from_secs_f64(imds_tests::bench::count(i) / rate)).into())
                .await;
        }
        let (client, report, latencies, permits) =
            (client.clone(), Arc::clone(&report), Arc::clone(&latencies), Arc::clone(&permits));
        let query = queries[i % queries.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            let started = Instant::now();
            let status = one(&client, addr, &query, &report).await;
            latencies.lock().unwrap().push(started.elapsed());
            *report.lock().unwrap().statuses.entry(status).or_default() += 1;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    // Nearest-rank percentile.
    let at = |percent: usize| {
        latencies.get((latencies.len().saturating_sub(1)) * percent / 100).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let mut report = report.lock().unwrap().clone();
    (report.p50_ms, report.p99_ms) = (at(50), at(99));
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// One request with its retries; returns the final status (0: no HTTP answer).
async fn one(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddrV4,
    query: &str,
    report: &Mutex<BurstReport>,
) -> u16 {
    let uri = format!("http://{addr}{TOKEN_PATH}?{query}");
    for attempt in 1..=ATTEMPTS {
        let request = http::Request::get(&uri).header("Metadata", "true").body(Empty::new()).expect("valid request");
        let response = match tokio::time::timeout(Duration::from_secs(30), client.request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return fail(report, format!("{query}: {e}")),
            Err(_) => return fail(report, format!("{query}: no answer in 30 s")),
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = response.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
        let retryable = matches!(status, 404 | 410 | 429) || status >= 500;
        if status == 200 {
            let token: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let access = token["access_token"].as_str().unwrap_or("");
            let param = |name: &str| {
                form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
            };
            // The fake's tokens read `fake-token:<client id>:<resource>`.
            let resource_ok = param("resource").is_some_and(|r| access.ends_with(&format!(":{r}")));
            let client_ok = param("client_id").is_none_or(|c| access.contains(&format!(":{c}:")));
            if !(resource_ok && client_ok) {
                report.lock().unwrap().wrong_tokens += 1;
            }
        }
        if !retryable || attempt == ATTEMPTS {
            return status;
        }
        {
            let mut r = report.lock().unwrap();
            *r.retried.entry(status).or_default() += 1;
            if retry_after.is_none() {
                r.retried_without_retry_after += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1).min(5))).await;
    }
    unreachable!("the last attempt returns")
}

fn fail(report: &Mutex<BurstReport>, what: String) -> u16 {
    let mut r = report.lock().unwrap();
    if r.failures.len() < 5 {
        r.failures.push(what);
    }
    0
}

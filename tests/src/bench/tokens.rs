//! P4 and P5: the token path under load, with the real agent binary, real kernel programs and
//! the fake IMDS (the real one cannot run here; the fake follows its contract).
//!
//! - P4: tokens served from the cache, each request on a new connection as curl makes them,
//!   against a bare hyper server answering the same body over the same path through the node,
//!   on the same runtime shape as the agent's (tokio's multi-threaded default). Throughput
//!   with 16 requests in flight; added latency one request at a time.
//! - P5: a 2,000 requests/s burst from 50 pods over 5 identities, each asking for tokens
//!   nobody has yet, and what reaches the fake IMDS: calls per second and in flight.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;

use super::{Effort, Figure, Measured};
use crate::{
    fake_imds::{Behaviour, FakeIdentity},
    http_server::HttpServer,
    node::{bound_pods_manifest, curl, pod_uid, Node, TestPod},
    BurstReport, Probe, Server, IMDS_IP,
};

const NS: &str = "bench";
const METADATA: SocketAddrV4 = SocketAddrV4::new(IMDS_IP, 80);
/// The baseline server: in the node namespace, on the agent's address (pods route it to the
/// node), another port — a destination the kernel programs do not redirect.
const BARE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 233, 0, 1), 8183);

/// `api-version=…&resource=…`.
fn token_query(resource: &str) -> String {
    let resource: String = form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    format!("api-version=2018-02-01&resource={resource}")
}

/// Runs one burst from `pod` and checks every request got its token.
fn burst(node: &Node, pod: &TestPod, to: SocketAddrV4, shape: crate::Burst, query: &str) -> BurstReport {
    let report = Probe::new(pod.ns(node), &pod.ctr)
        .paced_burst(to, shape, &[query.to_owned()])
        .wait()
        .burst
        .expect("a burst report");
    assert_eq!(report.statuses.get(&200), Some(&shape.count), "every request answered 200: {report:?}");
    assert_eq!(report.wrong_tokens, 0, "{report:?}");
    report
}

/// P4.
///
/// # Panics
/// When the agent cannot start or a request fails.
pub fn p4(effort: Effort) -> Figure {
    let (many, one_by_one) = if effort.connects < 1000 { (300, 50) } else { (10_000, 1_000) };
    let id = FakeIdentity::named("bench");
    let mut node = Node::new("bench-p4", vec![id.clone()]);
    let uid = pod_uid();
    node.write_manifest("policy.yaml", &bound_pods_manifest(NS, &[id], &[(uid.clone(), 0)]));
    let pod = node.pod(&uid);
    // A client making thousands of connections a second leaves as many in TIME_WAIT: let the
    // pod reuse them (after the kernel's 1 s) and use every port, as any load generator must,
    // or the run measures the port search instead, then runs out of ports.
    pod.ns(&node).sysctl("net.ipv4.tcp_tw_reuse", "1");
    pod.ns(&node).sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    node.start_agent(&[]);
    let query = token_query("https://vault.azure.net");
    // Fills the cache, and gives the body the baseline answers.
    let first = curl(
        &node,
        &pod,
        SocketAddr::V4(METADATA),
        &format!("/metadata/identity/oauth2/token?{query}"),
        &["Metadata: true"],
    );
    assert_eq!(first.status, 200, "{first:?}");
    let body = Bytes::from(first.body);
    let _bare = HttpServer::serve_on(tokio::runtime::Builder::new_multi_thread(), Server::bind(&node.ns, BARE), {
        move |_, _| {
            let body = body.clone();
            async move {
                let mut response = http::Response::new(Full::new(body));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json; charset=utf-8"),
                );
                response
            }
        }
    });

    let throughput = crate::Burst { count: many, concurrency: 16, per_second: None, keep_alive: false };
    let latency = crate::Burst { count: one_by_one, concurrency: 1, per_second: None, keep_alive: false };
    let (mut agent_rps, mut bare_rps, mut added_p50, mut added_p99) = (vec![], vec![], vec![], vec![]);
    let (mut agent_p99, mut bare_p99) = (vec![], vec![]);
    for round in 0..effort.rounds {
        // Alternate which goes first, so drift on the machine hits both alike.
        let order = if round % 2 == 0 { [METADATA, BARE] } else { [BARE, METADATA] };
        let mut seen = [None, None];
        for to in order {
            let t = burst(&node, &pod, to, throughput, &query);
            let l = burst(&node, &pod, to, latency, &query);
            seen[usize::from(to == BARE)] = Some((super::count(many) / t.seconds, l.p50_ms, l.p99_ms));
        }
        let [Some(agent), Some(bare)] = seen else { unreachable!("both measured") };
        agent_rps.push(agent.0);
        bare_rps.push(bare.0);
        added_p50.push(agent.1 - bare.1);
        added_p99.push(agent.2 - bare.2);
        agent_p99.push(agent.2);
        bare_p99.push(bare.2);
    }
    let (p50, p99) = (Measured::of(added_p50).median, Measured::of(added_p99).median);
    let figure = Figure::new(
        "P4",
        "token requests/s from the cache, new connection each (16 in flight)",
        "req/s",
        "≥ 0.85×; p99 added ≤ 0.1 ms",
    )
    .measured(
        Measured::of(agent_rps),
        Some(("bare hyper server, same body and path".to_owned(), Measured::of(bare_rps))),
    );
    let ratio = figure.ratio.unwrap_or(0.0);
    let summary = format!(
        "one request at a time, the agent adds {p50:.3} ms at p50 and {p99:.3} ms at p99 (p99 {:.3} ms vs {:.3} ms)",
        Measured::of(agent_p99).median,
        Measured::of(bare_p99).median
    );
    drop(pod);
    figure.judged(ratio >= 0.85 && p99 <= 0.1).noted(summary)
}

/// P5.
///
/// # Panics
/// When the agent cannot start.
pub fn p5(effort: Effort) -> Figure {
    const PODS: usize = 50;
    const RATE: f64 = 2000.0;
    let (seconds, resources, rounds) = if effort.connects < 1000 { (1, 4, 1) } else { (5, 20, 3) };
    let ids: Vec<FakeIdentity> = (0..5).map(|i| FakeIdentity::named(&format!("id{i}"))).collect();
    let mut node = Node::new("bench-p5", ids.clone());
    let assignments: Vec<(String, usize)> = (0..PODS).map(|n| (pod_uid(), n % ids.len())).collect();
    node.write_manifest("policy.yaml", &bound_pods_manifest(NS, &ids, &assignments));
    let pods: Vec<TestPod> = assignments.iter().map(|(uid, _)| node.pod(uid)).collect();
    node.start_agent(&[]);
    // IMDS takes its time (100 ms a token), so that concurrency upstream is real.
    node.fake.set_behaviour(Behaviour::Slow(Duration::from_millis(100)));
    let per_pod = RATE / super::count(PODS);
    let count = (per_pod * f64::from(seconds)) as usize;
    // Open loop: the rate alone sets the pace.
    let shape = crate::Burst { count, concurrency: count, per_second: Some(per_pod), keep_alive: false };

    let (mut peaks, mut in_flight, mut calls, mut offered) = (vec![], 0, 0, vec![]);
    let mut total = BurstReport::default();
    for round in 0..rounds {
        let since = Instant::now();
        node.fake.take_peak_in_flight();
        let running: Vec<_> = pods
            .iter()
            .zip(&assignments)
            .map(|(pod, (_, i))| {
                // Tokens nobody has yet: new resources every round.
                let queries: Vec<String> = (0..resources)
                    .map(|r| {
                        let query = token_query(&format!("https://r{round}-{r}.example.net"));
                        format!("{query}&client_id={}", ids[*i].client_id)
                    })
                    .collect();
                Probe::new(pod.ns(&node), &pod.ctr).paced_burst(METADATA, shape, &queries)
            })
            .collect();
        let reports: Vec<BurstReport> = running.into_iter().map(|p| p.wait().burst.expect("a burst report")).collect();
        let took = since.elapsed().as_secs_f64();
        peaks.push(super::count(node.fake.peak_per_second_since(Some(since))));
        in_flight = in_flight.max(node.fake.take_peak_in_flight());
        calls += node.fake.token_requests().iter().filter(|s| s.at >= since).count();
        offered.push(super::count(shape.count * PODS) / f64::from(seconds));
        for r in reports {
            merge(&mut total, r, took);
        }
    }
    let ok = total.statuses.get(&200).copied().unwrap_or(0);
    let unexplained = total.failures.len()
        + total.wrong_tokens
        + total.retried_without_retry_after
        + (total.requests - ok - told_to_retry(&total));
    let worst = peaks.iter().copied().fold(0.0, f64::max);
    let peak = Measured::of(peaks);
    let summary = format!(
        "{} requests at {:.0}/s offered from {PODS} pods, {} distinct tokens: {calls} upstream calls, peak {} per second and {in_flight} in flight; clients: {ok} got their token, {} were told to retry (with Retry-After) and gave up after 8 tries, {unexplained} unexplained errors; slowest round took {:.1} s",
        total.requests,
        Measured::of(offered).median,
        rounds * ids.len() * resources,
        worst,
        told_to_retry(&total),
        total.seconds
    );
    let met = worst <= 20.0 && in_flight <= 5 && unexplained == 0;
    drop(pods);
    Figure::new(
        "P5",
        "upstream IMDS calls per second (peak) in a 2,000 req/s burst, 50 pods, 5 identities",
        "calls/s",
        "≤ 20/s, ≤ 5 in flight, 0 unexplained errors",
    )
    .measured(peak, Some(("IMDS budget".to_owned(), Measured::of(vec![20.0]))))
    .judged(met)
    .noted(summary)
}

/// Final answers that told the client to retry later (IMDS's 429 and 5xx, with Retry-After).
fn told_to_retry(report: &BurstReport) -> usize {
    report.statuses.iter().filter(|(status, _)| **status == 429 || **status >= 500).map(|(_, n)| n).sum()
}

/// Adds `r` to `total`; `seconds` keeps the longest round.
fn merge(total: &mut BurstReport, r: BurstReport, seconds: f64) {
    total.requests += r.requests;
    for (status, n) in r.statuses {
        *total.statuses.entry(status).or_default() += n;
    }
    total.wrong_tokens += r.wrong_tokens;
    total.retried_without_retry_after += r.retried_without_retry_after;
    total.failures.extend(r.failures);
    total.seconds = total.seconds.max(seconds);
}

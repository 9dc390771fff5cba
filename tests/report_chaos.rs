//! The reporter against a real HTTP server on loopback: connection reuse, and a
//! chaos server (failures, delays, dropped connections) losing nothing.

mod http_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::flow_control::Concurrency;
use xzepr_consumer::report::{
    Ack, OwnedWork, Record, ReportError, Reporter, ReporterConfig, Status,
};

type Acks = Arc<Mutex<Vec<(String, Status, Result<String, ReportError>)>>>;

fn record(i: usize, status: Status, acks: &Acks) -> Record {
    let work_id = format!("w-{i}");
    let acks = Arc::clone(acks);
    let id = work_id.clone();
    Record {
        work: OwnedWork::new("R1", work_id, "deploy", "1.0.0", "linux", "svc"),
        status,
        details: json!({"i": i}),
        error: (status == Status::Failed).then(|| ("boom".to_owned(), "E1".to_owned())),
        trace: None,
        ack: Ack::new(move |r| acks.lock().unwrap().push((id, status, r))),
    }
}

async fn run(server: &http_support::Server, n: usize, config: ReporterConfig, pool: usize) -> Acks {
    let mut cc = XzeprClientConfig::new(server.url.clone(), "tok");
    cc.pool_max_idle_per_host = pool;
    let client = XzeprClient::new(cc).unwrap();
    let (reporter, task) = Reporter::start(client, config);
    let acks: Acks = Arc::default();
    for i in 0..n {
        reporter
            .send(record(i, Status::Started, &acks))
            .await
            .unwrap();
        let terminal = if i % 5 == 0 {
            Status::Failed
        } else {
            Status::Completed
        };
        reporter.send(record(i, terminal, &acks)).await.unwrap();
    }
    drop(reporter);
    assert!(
        task.drain(Duration::from_secs(120)).await,
        "reporter did not drain"
    );
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_posts_reuse_the_pooled_connections() {
    let server = http_support::start(http_support::Chaos::default()).await;
    let mut config = ReporterConfig::default();
    config.concurrency = Concurrency::Fixed(16);
    // hyper's pool may open a connection before a finished one is back in it, so
    // the pool is sized at twice the in-flight limit; reuse is what is asserted.
    let acks = run(&server, 2_000, config, 32).await;
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), 4_000);
    assert!(acks.iter().all(|(_, _, r)| r.is_ok()));
    let conns = server
        .seen
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("4000 posts over {conns} connections");
    assert!(conns <= 32, "{conns} connections for 4000 posts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_server_loses_nothing_and_started_precedes_terminal() {
    let chaos = http_support::Chaos {
        fail: 0.3,
        slow: 0.05,
        delay: Duration::from_millis(20),
        drop: 0.05,
        ..Default::default()
    };
    let server = http_support::start(chaos).await;
    let mut config = ReporterConfig::default();
    config.max_attempts = 40;
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(20);
    config.breaker_threshold = 1_000;
    let n = 500;
    let acks = run(&server, n, config, 32).await;
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), 2 * n, "every record acknowledged");
    for (id, status, r) in acks.iter() {
        assert!(r.is_ok(), "{id} {status:?}: {r:?}");
    }
    // What the server accepted: every work id once started, once terminal, started first.
    let accepted = server.seen.accepted.lock().unwrap();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for body in accepted.iter() {
        let id = body["payload"]["work_id"].as_str().unwrap().to_owned();
        order
            .entry(id)
            .or_default()
            .push(body["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(order.len(), n);
    for (id, names) in &order {
        assert_eq!(names[0], "deploy.started", "{id}: {names:?}");
        assert!(
            names
                .iter()
                .any(|n| n == "deploy.completed" || n == "deploy.failed"),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_records_are_coalesced_and_final_errors_come_back() {
    let server = http_support::start(http_support::Chaos::default()).await;
    let client = XzeprClient::new(XzeprClientConfig::new(server.url.clone(), "tok")).unwrap();
    let (reporter, task) = Reporter::start(client, ReporterConfig::default());
    let acks: Acks = Arc::default();
    for _ in 0..3 {
        reporter
            .send(record(1, Status::Started, &acks))
            .await
            .unwrap();
        reporter
            .send(record(1, Status::Completed, &acks))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reporter
            .stats()
            .coalesced
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    assert_eq!(acks.lock().unwrap().len(), 6);
    assert_eq!(
        server.seen.accepted.lock().unwrap().len(),
        2,
        "sent once each"
    );

    // A server that always fails: the record comes back failed, never dropped.
    let dead = http_support::start(http_support::Chaos {
        fail: 1.0,
        ..Default::default()
    })
    .await;
    let client = XzeprClient::new(XzeprClientConfig::new(dead.url.clone(), "tok")).unwrap();
    let mut config = ReporterConfig::default();
    config.max_attempts = 3;
    config.backoff_base = Duration::from_millis(1);
    let (reporter, task) = Reporter::start(client, config);
    let acks: Acks = Arc::default();
    reporter
        .send(record(9, Status::Started, &acks))
        .await
        .unwrap();
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    let acks = acks.lock().unwrap();
    assert!(
        matches!(
            &acks[0].2,
            Err(ReportError::Failed {
                attempts: 3,
                retryable: true,
                ..
            })
        ),
        "{:?}",
        acks[0].2
    );
    // The last attempt's client error is the source, not a flattened string.
    let err = acks[0].2.as_ref().unwrap_err();
    assert!(std::error::Error::source(err).is_some());
    assert!(
        err.client_error()
            .is_some_and(|e| e.status().is_some_and(|s| s >= 500)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_flight_are_sent_once_and_a_failed_started_holds_its_terminal() {
    // Every post takes 50 ms: the duplicates arrive while the first is in flight.
    let slow = http_support::start(http_support::Chaos {
        slow: 1.0,
        delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let client = XzeprClient::new(XzeprClientConfig::new(slow.url.clone(), "tok")).unwrap();
    let (reporter, task) = Reporter::start(client, ReporterConfig::default());
    let acks: Acks = Arc::default();
    for status in [
        Status::Started,
        Status::Started,
        Status::Completed,
        Status::Completed,
    ] {
        reporter.send(record(1, status, &acks)).await.unwrap();
    }
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    {
        let acks = acks.lock().unwrap();
        assert_eq!(acks.len(), 4);
        assert!(acks.iter().all(|(_, _, r)| r.is_ok()), "{acks:?}");
    }
    let names: Vec<String> = slow
        .seen
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["deploy.started", "deploy.completed"]);

    // A server that fails everything, slowly: the `started` fails for good, and
    // its waiting terminal fails with it without ever being sent.
    let dead = http_support::start(http_support::Chaos {
        fail: 1.0,
        slow: 1.0,
        delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let client = XzeprClient::new(XzeprClientConfig::new(dead.url.clone(), "tok")).unwrap();
    let mut config = ReporterConfig::default();
    config.max_attempts = 2;
    config.backoff_base = Duration::from_millis(1);
    let (reporter, task) = Reporter::start(client, config);
    let acks: Acks = Arc::default();
    reporter
        .send(record(2, Status::Started, &acks))
        .await
        .unwrap();
    reporter
        .send(record(2, Status::Completed, &acks))
        .await
        .unwrap();
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len(), 2);
    assert!(acks.iter().all(|(_, _, r)| r.is_err()), "{acks:?}");
    assert_eq!(
        dead.seen
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "two attempts at `started`, none at the terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_submitted_after_its_started_failed_for_good_is_never_sent() {
    // XZepr refuses every `started` (500) and takes everything else.
    let server = http_support::start(http_support::Chaos {
        fail_started: true,
        ..Default::default()
    })
    .await;
    let client = XzeprClient::new(XzeprClientConfig::new(server.url.clone(), "tok")).unwrap();
    let mut config = ReporterConfig::default();
    config.max_attempts = 2;
    config.backoff_base = Duration::from_millis(1);
    let (reporter, task) = Reporter::start(client, config);
    let acks: Acks = Arc::default();
    for (i, terminal) in [(1, Status::Completed), (2, Status::Failed)] {
        reporter
            .send(record(i, Status::Started, &acks))
            .await
            .unwrap();
        // The `started` has failed for good before its terminal is submitted.
        while acks.lock().unwrap().len() < 2 * i - 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        reporter.send(record(i, terminal, &acks)).await.unwrap();
    }
    while acks.lock().unwrap().len() < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        reporter
            .stats()
            .terminal_without_started
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    let acks = acks.lock().unwrap();
    for (id, status, r) in acks.iter() {
        match status {
            Status::Started => assert!(
                matches!(r, Err(ReportError::Failed { attempts: 2, .. })),
                "{id}: {r:?}"
            ),
            _ => assert!(
                matches!(
                    r,
                    Err(ReportError::Failed {
                        attempts: 0,
                        retryable: true,
                        ..
                    })
                ),
                "{id} {status:?} must fail unsent: {r:?}"
            ),
        }
    }
    assert!(
        server.seen.accepted.lock().unwrap().is_empty(),
        "no terminal went out without its started"
    );
    assert_eq!(
        server
            .seen
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        4,
        "two attempts at each `started`, none at a terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_lost_by_a_server_restart_is_discovered_again() {
    use wiremock::matchers::{body_partial_json, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    let listed = |id: &str| {
        json!({"data": [{"id": id, "name": "svc", "type": "worker", "version": "1.0.0",
            "description": "", "schema": {}, "fingerprint": "f",
            "created_at": "2026-11-23T00:00:00Z"}],
            "pagination": {"limit": 50, "offset": 0, "total": 1, "has_more": false}})
    };
    // Before the "restart" the list holds R-OLD; after it, nothing (once asked).
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(listed("R-OLD")))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"data": [], "pagination": {"limit": 50, "offset": 0, "total": 0, "has_more": false}}),
        ))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": "R-NEW"})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .and(body_partial_json(json!({"event_receiver_id": "R-OLD"})))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": "not_found"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .and(body_partial_json(json!({"event_receiver_id": "R-NEW"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": "E1"})))
        .mount(&server)
        .await;
    let client = XzeprClient::new(XzeprClientConfig::new(server.uri(), "tok")).unwrap();
    let receiver = client
        .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
        .await
        .unwrap();
    assert_eq!(receiver, "R-OLD");
    let (reporter, task) = Reporter::start(client, ReporterConfig::default());
    let own = reporter.own_receivers();
    own.insert("R-OLD");
    let acks: Acks = Arc::default();
    for i in 0..20 {
        let mut r = record(i, Status::Started, &acks);
        r.work = OwnedWork::new("R-OLD", format!("w-{i}"), "deploy", "1.0.0", "linux", "svc");
        reporter.send(r).await.unwrap();
    }
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    {
        let acks = acks.lock().unwrap();
        assert_eq!(acks.len(), 20);
        assert!(acks.iter().all(|(_, _, r)| r.is_ok()), "{acks:?}");
    }
    // Every post after the rediscovery went straight to the new receiver.
    let requests = server.received_requests().await.unwrap();
    let to_new = requests
        .iter()
        .filter(|r| r.url.path() == "/api/v1/events")
        .filter(|r| String::from_utf8_lossy(&r.body).contains("R-NEW"))
        .count();
    assert_eq!(to_new, 20);
    // The own-event guard's set followed the move.
    assert!(own.contains("R-OLD") && own.contains("R-NEW"));
}

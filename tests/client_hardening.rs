//! The client and reporter against the dev stack's XZepr stand-in with its two
//! switches open (issue 9): concurrent receiver creates that all succeed, and a
//! server that records an event but answers after the client gave up; plus an
//! XZepr restart under a running pipeline, requests built outside the crate, a
//! source event without `platform_id`, and the settings that must be refused.
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xzepr_consumer::client::{
    post_key, ClientError, CreateEvent, ReceiverQuery, WorkRef, XzeprClient, XzeprClientConfig,
};
use xzepr_consumer::config::{ConfigError, KafkaConsumerConfig};
use xzepr_consumer::devstack::StandIn;
use xzepr_consumer::report::{
    validate_work_fields, Ack, OwnedWork, Record, ReportError, Reporter, ReporterConfig, Status,
};

const TOKEN: &str = "tok";

fn client(standin: &StandIn) -> XzeprClient {
    XzeprClient::new(XzeprClientConfig::new(standin.url(), TOKEN)).unwrap()
}

async fn discover(client: &XzeprClient, name: &str) -> Result<String, ClientError> {
    client
        .discover_or_create_event_receiver(name, "worker", "1.0.0", "d", json!({}))
        .await
}

/// Polls `cond` until it holds; the deadline only stops a hung test.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_creating_at_once_converge_on_one_receiver() {
    let standin = StandIn::builder(TOKEN)
        .receiver_create_delay(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    // Four instances: four clients, sharing nothing in process.
    let c: Vec<XzeprClient> = (0..4).map(|_| client(&standin)).collect();
    let rounds = 200;
    let mut winners = Vec::new();
    for round in 0..rounds {
        let name = format!("svc-{round}");
        let (a, b, x, d) = tokio::join!(
            discover(&c[0], &name),
            discover(&c[1], &name),
            discover(&c[2], &name),
            discover(&c[3], &name),
        );
        let ids = [a.unwrap(), b.unwrap(), x.unwrap(), d.unwrap()];
        assert!(ids.iter().all(|id| *id == ids[0]), "round {round}: {ids:?}");
        winners.push(ids[0].clone());
    }
    let created = standin.stats().receivers.load(Relaxed);
    assert!(
        created > rounds,
        "the race window made duplicates ({created} receivers for {rounds} names)"
    );
    // A later instance, finding several, takes the same one.
    let late = client(&standin);
    for round in [0, rounds / 2, rounds - 1] {
        let name = format!("svc-{round}");
        assert_eq!(
            discover(&late, &name).await.unwrap(),
            winners[round as usize]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_discovery_in_flight_per_name_and_type_even_across_forget_and_rediscovery() {
    let standin = StandIn::builder(TOKEN)
        .receiver_create_delay(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let client = client(&standin);
    let first = {
        let c = client.clone();
        tokio::spawn(async move { discover(&c, "svc").await })
    };
    // The first discovery's create is inside the race window now.
    wait_until("the first create", || {
        standin.stats().receiver_requests.load(Relaxed) == 1
    })
    .await;
    client.forget_receiver("svc", "worker");
    let second = discover(&client, "svc").await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first, second);
    assert_eq!(standin.stats().receivers.load(Relaxed), 1, "created once");

    // XZepr restarts: eight tasks rediscover at once while the receiver is forgotten.
    standin.restart();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (c, stale) = (client.clone(), first.clone());
        tasks.spawn(async move { c.rediscover_receiver(&stale).await });
    }
    wait_until("the re-create", || {
        standin.stats().receiver_requests.load(Relaxed) == 2
    })
    .await;
    client.forget_receiver("svc", "worker");
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.push(r.unwrap().unwrap().expect("discovered by this client"));
    }
    assert!(
        ids.iter().all(|id| *id == ids[0] && *id != first),
        "{ids:?}"
    );
    assert_eq!(
        standin.stats().receivers.load(Relaxed),
        2,
        "re-created once"
    );
    assert_eq!(standin.receivers().len(), 1);
}

type Acks = Arc<Mutex<Vec<(String, Status, Result<String, ReportError>)>>>;

fn record(receiver: &str, work_id: &str, platform_id: &str, status: Status, acks: &Acks) -> Record {
    let acks = Arc::clone(acks);
    let id = work_id.to_owned();
    Record {
        work: OwnedWork::new(receiver, work_id, "deploy", "1.0.0", platform_id, "svc"),
        status,
        details: json!({"step": 1}),
        error: None,
        trace: None,
        ack: Ack::new(move |r| acks.lock().unwrap().push((id, status, r))),
    }
}

/// Posts `started` then `completed` for `n` works and drains the reporter.
async fn report_works(
    client: XzeprClient,
    config: ReporterConfig,
    receiver: &str,
    n: usize,
) -> (Acks, u64) {
    let (reporter, task) = Reporter::start(client, config);
    let acks: Acks = Arc::default();
    for i in 0..n {
        let work = format!("w-{i}");
        for status in [Status::Started, Status::Completed] {
            reporter
                .send(record(receiver, &work, "linux", status, &acks))
                .await
                .unwrap();
        }
    }
    // Every re-send is counted before its record is acknowledged.
    wait_until("every record acknowledged", || {
        acks.lock().unwrap().len() == 2 * n
    })
    .await;
    let resent = reporter.stats().resent_after_lost_response.load(Relaxed);
    drop(reporter);
    assert!(task.drain(Duration::from_secs(60)).await, "drained");
    (acks, resent)
}

/// The recorded lifecycle events per (work id, status), each with its post key.
fn recorded_by_key(standin: &StandIn) -> HashMap<(String, String), Vec<String>> {
    let mut by_key: HashMap<(String, String), Vec<String>> = HashMap::new();
    for e in standin.recorded_events() {
        let p = &e["payload"];
        let key = (
            p["work_id"].as_str().unwrap().to_owned(),
            p["status"].as_str().unwrap().to_owned(),
        );
        let post_key = p["details"]["post_key"].as_str().unwrap_or("").to_owned();
        by_key.entry(key).or_default().push(post_key);
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_xzepr_within_the_timeout_gets_one_record_per_status() {
    assert!(
        XzeprClientConfig::new("http://x", TOKEN).request_timeout >= Duration::from_secs(30),
        "the default covers XZepr's 10-14 s with its Kafka down"
    );
    // Scaled down: XZepr's ~12 s is 300 ms here, with a client timeout to match
    // the default's margin over it.
    let standin = StandIn::builder(TOKEN)
        .latency(Duration::ZERO)
        .response_delay(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let receiver = discover(&client(&standin), "svc").await.unwrap();
    let c = XzeprClient::new(
        XzeprClientConfig::new(standin.url(), TOKEN).with_request_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let n = 8;
    let (acks, resent) = report_works(c, ReporterConfig::default(), &receiver, n).await;
    assert!(acks.lock().unwrap().iter().all(|(_, _, r)| r.is_ok()));
    let by_key = recorded_by_key(&standin);
    assert_eq!(by_key.len(), 2 * n);
    for ((work, status), keys) in &by_key {
        assert_eq!(keys, &[post_key(work, status)], "{work} {status}");
    }
    assert_eq!(resent, 0);
    assert_eq!(
        standin.stats().delayed_responses.load(Relaxed),
        2 * n as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_xzepr_past_the_timeout_gets_duplicates_with_one_key_each_counted() {
    let standin = StandIn::builder(TOKEN)
        .latency(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let receiver = discover(&client(&standin), "svc").await.unwrap();
    let n = 8;
    // The next 2n posts are recorded at once and answered after the client gave
    // up: lost responses whose events are recorded.
    standin.delay_responses(Duration::from_millis(600), 2 * n as u64);
    let c = XzeprClient::new(
        XzeprClientConfig::new(standin.url(), TOKEN)
            .with_request_timeout(Duration::from_millis(150)),
    )
    .unwrap();
    let mut config = ReporterConfig::default();
    config.max_attempts = 30;
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(10);
    config.breaker_threshold = 10_000;
    let (acks, resent) = report_works(c, config, &receiver, n).await;
    {
        let acks = acks.lock().unwrap();
        assert_eq!(acks.len(), 2 * n);
        assert!(acks.iter().all(|(_, _, r)| r.is_ok()), "{acks:?}");
    }
    let by_key = recorded_by_key(&standin);
    assert_eq!(by_key.len(), 2 * n, "every (work, status) recorded");
    let mut duplicates = 0;
    for ((work, status), keys) in &by_key {
        assert!(
            keys.iter().all(|k| *k == post_key(work, status)),
            "{work} {status}: {keys:?}"
        );
        duplicates += keys.len() as u64 - 1;
    }
    assert!(duplicates > 0, "the delay made lost responses");
    assert_eq!(resent, duplicates, "each duplicate is a counted re-send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_platform_id_is_posted_under_the_fallback() {
    let standin = StandIn::builder(TOKEN)
        .latency(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let client = client(&standin);
    let receiver = discover(&client, "svc").await.unwrap();
    let (reporter, task) = Reporter::start(client.clone(), ReporterConfig::default());
    let acks: Acks = Arc::default();
    for status in [Status::Started, Status::Completed] {
        reporter
            .send(record(&receiver, "w-1", "", status, &acks))
            .await
            .unwrap();
    }
    drop(reporter);
    assert!(task.drain(Duration::from_secs(30)).await);
    {
        let acks = acks.lock().unwrap();
        assert!(acks.iter().all(|(_, _, r)| r.is_ok()), "{acks:?}");
    }
    let events = standin.recorded_events();
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e["platform_id"] == "svc"),
        "{events:?}"
    );
    // The client's own lifecycle calls fall back the same way.
    client
        .post_work_failed(
            &receiver,
            "w-2",
            "deploy",
            "1",
            "",
            "svc",
            "boom",
            "E1",
            json!({}),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn every_request_type_is_built_and_sent_from_outside_the_crate() {
    let standin = StandIn::builder(TOKEN)
        .latency(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let config = XzeprClientConfig::new(standin.url(), TOKEN)
        .with_request_timeout(Duration::from_secs(20))
        .with_connect_timeout(Duration::from_secs(2))
        .with_pool_max_idle_per_host(4)
        .with_pool_idle_timeout(Duration::from_secs(30));
    let client = XzeprClient::new(config).unwrap();
    let receiver = discover(&client, "svc").await.unwrap();

    let event = CreateEvent::new("deploy.finished", &receiver)
        .with_version("1.2.0")
        .with_release("1.2.0")
        .with_platform_id("linux")
        .with_package("deployer")
        .with_description("a deployment finished")
        .with_payload(json!({"region": "eu"}))
        .with_success(false);
    let id = client.create_event(&event).await.unwrap();
    let recorded = standin.recorded_events();
    let sent = recorded.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(sent["name"], "deploy.finished");
    assert_eq!(sent["success"], false);
    assert_eq!(sent["payload"], json!({"region": "eu"}));

    let page = client
        .list_event_receivers(
            &ReceiverQuery::new()
                .with_name("svc")
                .with_type("worker")
                .with_version("1.0.0")
                .with_limit(10)
                .with_offset(0),
        )
        .await
        .unwrap();
    assert!(page.data.iter().any(|r| r.id == receiver));

    let work = WorkRef::new(&receiver, "w-1", "deploy", "1.2.0", "linux", "deployer");
    for body in [
        work.started(json!({})),
        work.completed(true, json!({})),
        work.failed("boom", "E1", Value::Null),
    ] {
        client.create_event(&body).await.unwrap();
    }
    assert_eq!(standin.stats().started.load(Relaxed), 1);
    assert_eq!(standin.stats().completed.load(Relaxed), 1);
    assert_eq!(standin.stats().failed.load(Relaxed), 1);
}

#[tokio::test]
async fn without_a_token_no_authorization_is_sent_and_a_refusal_names_the_variable() {
    let server = http_support::start(http_support::Chaos::default()).await;
    let config =
        XzeprClientConfig::from_env_with(|k| (k == "XZEPR_API_URL").then(|| server.url.clone()))
            .unwrap();
    let client = XzeprClient::new(config).unwrap();
    client
        .post_work_started("R1", "w-1", "deploy", "1", "linux", "svc", json!({}))
        .await
        .unwrap();
    assert_eq!(*server.seen.authorization.lock().unwrap(), [None]);

    // A server that wants a token: the auth error, naming the variable.
    let standin = StandIn::builder(TOKEN).start().await.unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), "")).unwrap();
    let e = discover(&client, "svc").await.unwrap_err();
    assert!(e.is_unauthorized() && !e.is_retryable(), "{e}");
    assert!(e.to_string().contains("XZEPR_API_TOKEN"), "{e}");
    // And a stand-in without authentication takes it.
    let open = StandIn::builder("").start().await.unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(open.url(), "")).unwrap();
    discover(&client, "svc").await.unwrap();
}

#[test]
fn settings_that_would_undo_the_guarantees_are_refused_by_name() {
    let err = KafkaConsumerConfig::new("127.0.0.1:9092", "t", "svc")
        .set("enable.auto.commit", "true")
        .to_client_config()
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Reserved { property, .. } if property == "enable.auto.commit"),
        "{err}"
    );
    assert!(err.to_string().contains("enable.auto.commit"), "{err}");

    for (fields, name) in [
        (["", "1.0.0", "1.0.0", "svc"], "work_name"),
        (["deploy", "", "1.0.0", "svc"], "work_version"),
        (["deploy", "1.0.0", "", "svc"], "release"),
        (["deploy", "1.0.0", "1.0.0", ""], "package"),
    ] {
        let err = validate_work_fields(fields[0], fields[1], fields[2], fields[3]).unwrap_err();
        assert!(
            matches!(err, ConfigError::Empty { name: n } if n == name),
            "{err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// XZepr restarts (fresh ids) under a running pipeline with automatic
/// lifecycle: the reporter rediscovers its receiver under a new id, and the
/// pipeline must keep skipping its own republished posts, now under that id.
#[test]
fn own_events_stay_skipped_after_an_xzepr_restart() {
    use xzepr_consumer::decode::CloudEvent;
    use xzepr_consumer::devstack::KafkaSink;
    use xzepr_consumer::generate::xzepr_event;
    use xzepr_consumer::handler::Work;
    use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};

    const TOPIC: &str = "xzepr.dev.events";
    const PARTITIONS: i32 = 4;
    const HALF: u64 = 100;
    let cluster = kafka_support::cluster(TOPIC, PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sink = Arc::new(KafkaSink::new(&brokers, TOPIC).unwrap());
    let standin = rt
        .block_on(
            StandIn::builder(TOKEN)
                .latency(Duration::from_millis(1))
                .sink(sink)
                .start(),
        )
        .unwrap();
    let client = client(&standin);
    let receiver = rt.block_on(discover(&client, "selffeed")).unwrap();
    let (reporter, _task) =
        rt.block_on(async { Reporter::start(client.clone(), ReporterConfig::default()) });
    // Lifecycle events of our own work that reached the handler: the loop.
    let own_handled = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&own_handled);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, TOPIC, "selffeed"))
        .workers(2)
        .commit_interval(Duration::from_millis(100))
        .lifecycle(
            reporter,
            WorkTemplate::new(receiver.clone(), "selffeed", "1.0.0", "selffeed"),
        )
        .start(
            move |ev: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                if ev.event_type().starts_with("selffeed.") {
                    counted.fetch_add(1, Relaxed);
                }
                Ok(())
            },
        )
        .unwrap();
    let foreign =
        |offset: u64| move |i: u64| xzepr_event(i + offset, "01SOMEBODYELSE000000000000").1;
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                running.metrics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stats = standin.stats();
    kafka_support::produce(&brokers, TOPIC, PARTITIONS, HALF, foreign(0));
    wait("the first half reported", &|| {
        stats.completed.load(Relaxed) >= HALF
    });
    standin.restart();
    kafka_support::produce(&brokers, TOPIC, PARTITIONS, HALF, foreign(HALF));
    wait("the second half reported", &|| {
        stats.completed.load(Relaxed) >= 2 * HALF
    });
    // Then everything on the topic consumed: what we produced, and everything the
    // stand-in published (its receiver events and every post). A feedback loop
    // never gets there; it shows as own events handled.
    wait("the topic consumed", &|| {
        if own_handled.load(Relaxed) > 0 {
            return true;
        }
        let on_topic: i64 = kafka_support::end_offsets(&brokers, TOPIC, PARTITIONS)
            .values()
            .sum();
        let published = stats.receivers.load(Relaxed) + stats.events.load(Relaxed);
        let m = running.metrics();
        on_topic as u64 == 2 * HALF + published && m.consumed == on_topic as u64
    });
    assert_ne!(
        standin.receivers()[0]["id"].as_str(),
        Some(receiver.as_str()),
        "the restart gave the receiver a fresh id"
    );
    assert_eq!(own_handled.load(Relaxed), 0, "own events handled again");
    let m = running.metrics();
    assert!(m.own_skipped > 0, "{m:?}");
    running.shutdown();
    running.join().unwrap();
}

//! `xzepr-consumer offsets show|reset` and `redrive`, the binary against the
//! mock cluster: the thin drivers reach the library and print what it did.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod kafka_support;

use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::pipeline::dead_letter_headers;

use kafka_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_xzepr-consumer");

/// Runs the binary with `args`: (success, stdout, stderr).
fn cli(brokers: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--brokers", brokers])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn offsets_show_and_reset_print_what_they_see_and_do() {
    let cluster = cluster("cli-replay", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "cli-replay", 2, 10, |i| {
        i.to_string().into_bytes()
    });
    commit_with_metadata(&brokers, "g", "cli-replay", 0, 3, "");
    let group = ["--group", "g", "--topic", "cli-replay"];

    let (ok, out, err) = cli(&brokers, &[&["offsets", "show"][..], &group].concat());
    assert!(ok, "{err}");
    let row = |p: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(p))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap()
    };
    assert_eq!(&row("0")[2..6], ["3", "0", "5", "2"], "{out}");
    assert_eq!(row("1")[2], "-", "{out}");

    let reset = |to: &[&str]| cli(&brokers, &[&["offsets", "reset"][..], &group, to].concat());
    let (ok, out, err) = reset(&["--to-latest", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("dry run: 2 partition(s) would move"), "{out}");
    assert_eq!(committed(&brokers, "g", "cli-replay", 2)[&0], 3);
    let (ok, _, err) = reset(&["--shift-by", "-2"]);
    assert!(!ok && err.contains("no committed offset"), "{err}");
    let (ok, _, err) = reset(&[]);
    assert!(!ok && err.contains("--to-"), "a target is required: {err}");
    let (ok, out, err) = reset(&["--to-earliest"]);
    assert!(ok, "{err}");
    assert!(out.contains("moved 2 partition(s)"), "{out}");
    assert_eq!(committed(&brokers, "g", "cli-replay", 2)[&0], 0);
}

#[test]
fn redrive_prints_what_it_moves_by_reason() {
    let cluster = cluster("cli-redrive", 1);
    cluster.create_topic("cli-redrive.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for reason in ["handler_failed", "malformed"] {
        let h = [
            (dead_letter_headers::REASON, reason),
            (dead_letter_headers::TOPIC, "cli-redrive"),
            (dead_letter_headers::PARTITION, "0"),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, v)| {
            h.insert(Header {
                key,
                value: Some(v),
            })
        });
        p.send(
            BaseRecord::to("cli-redrive.dlq")
                .key("k")
                .payload("{}")
                .headers(h),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    let from = ["redrive", "--from", "cli-redrive.dlq"];
    let (ok, out, err) = cli(&brokers, &[&from[..], &["--dry-run"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("would redrive 2"), "{out}");
    let (ok, out, err) = cli(&brokers, &[&from[..], &["--reason", "handler"]].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains("redrove 1") && out.contains("handler_failed: 1"),
        "{out}"
    );
    assert_eq!(end_offsets(&brokers, "cli-redrive", 1)[&0], 1);
    let (ok, _, err) = cli(&brokers, &[&from[..], &["--reason", "sideways"]].concat());
    assert!(!ok && err.contains("reason"), "{err}");
}

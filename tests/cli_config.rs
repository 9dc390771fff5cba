//! `run --config FILE` reaches every setting of the library's
//! `PipelineConfig`, the flags override the file, and a setting the library
//! does not know is refused by name: the command line has what a Rust
//! service has, by construction.
#![cfg(all(feature = "cli", target_os = "linux"))]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use xzepr_consumer::pipeline::PipelineConfig;

const BIN: &str = env!("CARGO_BIN_EXE_xzepr-consumer");

fn write(name: &str, value: &Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xzepr-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

/// `run --print-config` with `args`: (success, stdout, stderr).
fn print_config(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["run", "--service-name", "svc", "--print-config"])
        .args(args)
        .args(["--exec", "true"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration with a value other than the default for every setting
/// that has one worth changing, written as a service would.
fn everything() -> Value {
    json!({
        "ordering": "per_key",
        "assignment": "cooperative",
        "max_in_flight": 77,
        "batch": 9,
        "buffer_budget": 1_048_576,
        "max_buffered": 1234,
        "pause_after": "400ms",
        "commit_interval": "250ms",
        "drain_timeout": "7s",
        "poll_interval": "20ms",
        "max_tracked": 4321,
        "completion_map": false,
        "completion_map_max_bytes": 1024,
        "stall_timeout": "2m",
        "start_from": "2026-12-05T14:00:00Z",
        "workers": 3,
        "handler_timeout": "45s",
        "retry": {"max_attempts": 4, "backoff_base": "50ms", "backoff_max": "5s",
                  "retry_errors": false, "retry_timeouts": true, "retry_panics": true,
                  "delay_topics": []},
        "types": ["deployment.", "build.*.done"],
        "skip_own_events": false,
        "own_receiver_id": "01OWNRECEIVER",
        "malformed": "hold",
        "decoder": {"max_payload_bytes": 65536, "max_depth": 32, "simd_min_bytes": 2048},
        "dead_letter": {"topic": "svc.dlq", "message_timeout": "20s",
                        "properties": {"compression.type": "zstd"}},
        "idempotency_key": {"header": "x-key"},
        "metrics_addr": "127.0.0.1:9464",
        "rate_limit": {"per_second": 250.0, "burst": 25, "per_key": true, "max_keys": 500},
        "report_concurrency": {"adaptive": {"min": 2, "max": 64}},
        "traces": false
    })
}

#[test]
fn concurrency_and_rate_flags_reach_the_settings() {
    let (ok, stdout, stderr) = print_config(&[
        "--concurrency",
        "adaptive:2-48",
        "--rate",
        "2000",
        "--rate-burst",
        "100",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["max_in_flight"],
        json!({"adaptive": {"min": 2, "max": 48}})
    );
    assert_eq!(v["rate_limit"]["per_second"], 2000.0);
    assert_eq!(v["rate_limit"]["burst"], 100);
}

#[test]
fn every_setting_of_the_library_is_reachable_through_the_config_file() {
    let file = everything();
    // The file names every setting the library has: a new setting that the
    // command line cannot reach fails here until it is added above.
    let mut names: Vec<String> = file.as_object().unwrap().keys().cloned().collect();
    let mut library = PipelineConfig::setting_names();
    names.sort();
    library.sort();
    assert_eq!(
        names, library,
        "settings in the library but not in this test"
    );

    let path = write("everything.json", &file);
    let (ok, stdout, stderr) = print_config(&["--config", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed, file, "the printed settings are the file's");
}

#[test]
fn flags_override_the_file_and_defaults_fill_only_what_neither_set() {
    let path = write(
        "partial.json",
        &json!({"max_in_flight": 7, "retry": {"backoff_base": "1s", "backoff_max": "8s"},
                "commit_interval": "300ms"}),
    );
    let (ok, stdout, stderr) = print_config(&[
        "--config",
        path.to_str().unwrap(),
        "--concurrency",
        "3",
        "--retries",
        "4",
        "--ordering",
        "none",
        "--assignment",
        "cooperative",
        "--dead-letter-topic",
        "x.dlq",
        "--start-from",
        "2026-12-05T16:00:00+02:00",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["max_in_flight"], 3);
    assert_eq!(v["retry"]["max_attempts"], 5);
    assert_eq!(
        v["retry"]["backoff_base"], "1s",
        "the file's backoff is kept"
    );
    assert_eq!(v["ordering"], "unordered");
    assert_eq!(v["assignment"], "cooperative");
    assert_eq!(v["commit_interval"], "300ms");
    assert_eq!(v["dead_letter"]["topic"], "x.dlq");
    assert_eq!(v["malformed"], "dead_letter", "with a dead-letter topic");
    assert_eq!(v["start_from"], "2026-12-05T14:00:00Z", "in UTC");
    // The command's own defaults apply where neither the file nor a flag spoke.
    assert_eq!(v["handler_timeout"], "1m");

    let (ok, stdout, stderr) = print_config(&[]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["max_in_flight"], 16, "--exec's default concurrency");
    assert_eq!(
        v["retry"]["max_attempts"], 1,
        "--exec does not retry by default"
    );
    assert_eq!(v["malformed"], "skip");
}

#[test]
fn an_unknown_or_malformed_setting_fails_naming_it() {
    let path = write("typo.json", &json!({"max_inflight": 8}));
    let (ok, _, stderr) = print_config(&["--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("max_inflight"), "{stderr}");

    let path = write("bad.json", &json!({"retry": {"max_attempts": 0}}));
    let (ok, _, stderr) = print_config(&["--config", path.to_str().unwrap()]);
    // The file parses; `build()` refuses it, naming the field, before any
    // connection: `--print-config` shows what was read, `run` refuses it.
    assert!(ok, "{stderr}");
    let out = Command::new(BIN)
        .args(["run", "--service-name", "svc", "--no-report"])
        .args(["--config", path.to_str().unwrap(), "--exec", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("retry.max_attempts"), "{stderr}");

    let (ok, _, stderr) = print_config(&["--config", "/nonexistent/xzepr.json"]);
    assert!(!ok);
    assert!(stderr.contains("--config"), "{stderr}");
}

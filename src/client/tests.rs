use super::discovery::pick_winner;
use super::*;

#[test]
fn errors_stay_small_and_classify() {
    assert!(
        std::mem::size_of::<ClientError>() <= 40,
        "{}",
        std::mem::size_of::<ClientError>()
    );
    assert!(ClientError::Timeout(Duration::from_secs(1)).is_retryable());
    assert!(!ClientError::Unauthorized { status: 401 }.is_retryable());
    let e = |status| {
        ClientError::Api(Box::new(api_error(
            StatusCode::from_u16(status).unwrap(),
            b"x",
        )))
    };
    assert!(e(500).is_retryable());
    assert!(e(429).is_retryable());
    assert!(!e(400).is_retryable());
}

#[test]
fn lifecycle_bodies_follow_the_contract() {
    let w = WorkRef::new("R1", "w-1", "deploy", "2.0.0", "linux", "deployer");
    let s = w.started(json!({"k": 1}));
    assert_eq!(s.name, "deploy.started");
    assert_eq!((s.version.as_str(), s.release.as_str()), ("2.0.0", "2.0.0"));
    assert_eq!(s.description, "Work started: deploy (w-1)");
    assert!(s.success);
    assert_eq!(s.payload["status"], "started");
    assert_eq!(s.payload["work_id"], "w-1");
    assert!(s.payload["started_at"].as_str().unwrap().ends_with('Z'));
    let c = w.completed(true, json!({}));
    assert_eq!(
        (c.name.as_str(), c.payload["success"].as_bool()),
        ("deploy.completed", Some(true))
    );
    let f = w.failed("boom", "E1", json!({"step": 3}));
    assert_eq!(f.name, "deploy.failed");
    assert!(!f.success);
    assert_eq!(
        f.payload["details"],
        json!({"step": 3, "post_key": "w-1:failed", "error": "boom", "error_code": "E1"})
    );
    assert_eq!(
        s.payload["details"],
        json!({"k": 1, "post_key": "w-1:started"})
    );
    assert_eq!(c.payload["details"]["post_key"], "w-1:completed");
    assert_eq!(f.event_receiver_id, "R1");
    assert_eq!(f.package, "deployer");
}

#[test]
fn encoded_lifecycle_bodies_equal_the_create_event_ones() {
    let w = WorkRef::new("R1", "w-\"1", "deploy", "2.0.0", "linux", "deployer");
    let without_time = |mut v: Value| {
        let p = v["payload"].as_object_mut().unwrap();
        assert!(p
            .remove("started_at")
            .or(p.remove("completed_at"))
            .is_some());
        v
    };
    let details = [
        json!({"step": 3, "error": "theirs"}),
        Value::Null,
        json!([1, 2]),
    ];
    for d in &details {
        let cases = [
            (Phase::new(Status::Started, ("", "")), w.started(d.clone())),
            (
                Phase::new(Status::Completed, ("", "")),
                w.completed(true, d.clone()),
            ),
            (
                Phase::new(Status::Failed, ("bo\nom", "E1")),
                w.failed("bo\nom", "E1", d.clone()),
            ),
        ];
        for (phase, event) in cases {
            let encoded = serde_json::to_vec(&LifecycleBody::new(w, phase, d)).unwrap();
            let encoded: Value = serde_json::from_slice(&encoded).unwrap();
            assert_eq!(
                without_time(encoded),
                without_time(serde_json::to_value(&event).unwrap()),
                "{phase:?} {d}"
            );
        }
    }
    let f = w.failed("boom", "E1", json!([1]));
    assert_eq!(
        f.payload["details"],
        json!({"context": [1], "post_key": "w-\"1:failed", "error": "boom", "error_code": "E1"})
    );
    // `details` is always an object, with the post key (the caller's replaced).
    assert_eq!(
        w.started(Value::Null).payload["details"],
        json!({"post_key": "w-\"1:started"})
    );
    assert_eq!(
        w.started(json!({"post_key": "theirs"})).payload["details"],
        json!({"post_key": "w-\"1:started"})
    );
    assert_eq!(
        w.completed(true, json!("x")).payload["details"],
        json!({"context": "x", "post_key": "w-\"1:completed"})
    );
    assert_eq!(post_key("w-\"1", "completed"), "w-\"1:completed");
    // The plan's `completed(false)` is the contract's `failed`.
    let u = w.completed(false, json!({"error": "no quorum", "step": 2}));
    assert_eq!(u.name, "deploy.failed");
    assert!(!u.success);
    assert_eq!(
        u.payload["details"],
        json!({"step": 2, "post_key": "w-\"1:failed", "error": "no quorum", "error_code": "unsuccessful"})
    );
}

#[test]
fn empty_required_fields_fall_back() {
    let w = WorkRef::new("R1", "w-1", "", " ", "", "deployer");
    let e = w.started(Value::Null);
    assert_eq!(e.name, "unknown.started");
    assert_eq!(
        (e.version.as_str(), e.release.as_str()),
        ("unknown", "unknown")
    );
    assert_eq!(e.platform_id, "deployer", "the service's name");
    let w = WorkRef::new("R1", "w-1", "deploy", "1", "", "");
    let e = w.completed(true, Value::Null);
    assert_eq!(
        (e.platform_id.as_str(), e.package.as_str()),
        ("unknown", "unknown")
    );
    // The encoded body (the reporter's path) falls back the same way.
    let body = serde_json::to_value(LifecycleBody::new(
        w,
        Phase::new(Status::Started, ("", "")),
        &Value::Null,
    ))
    .unwrap();
    assert_eq!(
        (body["platform_id"].as_str(), body["package"].as_str()),
        (Some("unknown"), Some("unknown"))
    );
}

#[test]
fn the_winner_is_the_earliest_then_the_smallest_id() {
    let r = |id: &str, at: &str| EventReceiver {
        id: id.into(),
        name: "n".into(),
        receiver_type: "t".into(),
        version: "1".into(),
        description: String::new(),
        schema: Value::Null,
        fingerprint: String::new(),
        created_at: at.into(),
    };
    let all = [
        r("B", "2026-01-01T00:00:01Z"),
        r("C", "2026-01-01T00:00:00.5+00:00"),
        r("A", "2026-01-01T00:00:01Z"),
        r("0", "not a time"),
    ];
    assert_eq!(pick_winner(&all).unwrap().id, "C");
    assert_eq!(pick_winner(&all[..1]).unwrap().id, "B");
    assert_eq!(
        pick_winner(&[all[0].clone(), all[2].clone()]).unwrap().id,
        "A"
    );
    assert_eq!(
        pick_winner(&[all[3].clone(), all[0].clone()]).unwrap().id,
        "B"
    );
    assert!(pick_winner(&[]).is_none());
}

#[test]
fn defaults_and_a_missing_token() {
    let c = XzeprClientConfig::new("http://x", "");
    assert!(
        c.request_timeout >= Duration::from_secs(30),
        "covers XZepr's 10-14 s"
    );
    assert!(c.connect_timeout < c.request_timeout);
    let c = XzeprClientConfig::from_env_with(|_| None).unwrap();
    assert_eq!(c.token, "");
    assert!(format!("{c:?}").contains("<none>"));
    let lost = ClientError::ResponseLost {
        timed_out: true,
        source: None,
    };
    assert!(lost.is_retryable() && lost.is_timeout() && lost.is_response_lost());
    assert!(!ClientError::Timeout(Duration::from_secs(1)).is_response_lost());
    assert!(ClientError::Unauthorized { status: 401 }
        .to_string()
        .contains("XZEPR_API_TOKEN"));
}

#[test]
fn config_from_env_and_token_never_printed() {
    let c = XzeprClientConfig::from_env_with(|k| {
        (k == "XZEPR_API_TOKEN").then(|| "s3cr3t-token".to_owned())
    })
    .unwrap();
    assert_eq!(c.base_url, "http://localhost:8042");
    assert!(!format!("{c:?}").contains("s3cr3t"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async { XzeprClient::new(c) }).unwrap();
    assert!(!format!("{client:?}").contains("s3cr3t"));
    assert!(XzeprClient::new(XzeprClientConfig::new("ftp://x", "t")).is_err());
}

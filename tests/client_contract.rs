//! The XZepr client against the contract, on wiremock: paths, headers, bodies,
//! the discovery walk over a server that ignores paging and filters, and the
//! mapping of error statuses.

use serde_json::{json, Value};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};
use xzepr_consumer::client::{ClientError, XzeprClient, XzeprClientConfig};

fn client(server: &MockServer) -> XzeprClient {
    XzeprClient::new(XzeprClientConfig::new(server.uri(), "tok-123")).unwrap()
}

fn receiver(i: usize, name: &str, ty: &str) -> Value {
    json!({"id": format!("R{i:03}"), "name": name, "type": ty, "version": "1.0.0",
           "description": "", "schema": {}, "fingerprint": "f", "created_at": "2026-11-23T00:00:00Z"})
}

#[tokio::test]
async fn create_event_sends_the_contract_body_with_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .and(header("authorization", "Bearer tok-123"))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": "E1"})))
        .expect(3)
        .mount(&server)
        .await;
    let c = client(&server);
    let id = c
        .post_work_started(
            "R1",
            "w-1",
            "deploy",
            "1.2.0",
            "linux",
            "svc",
            json!({"a": 1}),
        )
        .await
        .unwrap();
    assert_eq!(id, "E1");
    c.post_work_completed(
        "R1",
        "w-1",
        "deploy",
        "1.2.0",
        "linux",
        "svc",
        true,
        json!({}),
    )
    .await
    .unwrap();
    c.post_work_failed(
        "R1",
        "w-1",
        "deploy",
        "1.2.0",
        "linux",
        "svc",
        "boom",
        "E42",
        json!({}),
    )
    .await
    .unwrap();
    let reqs = server.received_requests().await.unwrap();
    let bodies: Vec<Value> = reqs
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    for (b, (name, success)) in bodies.iter().zip([
        ("deploy.started", true),
        ("deploy.completed", true),
        ("deploy.failed", false),
    ]) {
        let keys: std::collections::BTreeSet<&str> =
            b.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "description",
                "event_receiver_id",
                "name",
                "package",
                "payload",
                "platform_id",
                "release",
                "success",
                "version"
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(b["name"], name);
        assert_eq!(b["success"], success);
        assert_eq!(b["version"], "1.2.0");
        assert_eq!(b["release"], "1.2.0");
        assert_eq!(b["package"], "svc");
        assert_eq!(b["event_receiver_id"], "R1");
        assert_eq!(b["payload"]["work_id"], "w-1");
    }
    assert_eq!(bodies[0]["description"], "Work started: deploy (w-1)");
    assert_eq!(bodies[2]["payload"]["details"]["error"], "boom");
    assert_eq!(bodies[2]["payload"]["details"]["error_code"], "E42");
}

/// A list endpoint like the real server's: every receiver, whatever the query.
struct IgnoresPaging(Vec<Value>);

impl Respond for IgnoresPaging {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({
            "data": self.0,
            "pagination": {"limit": 50, "offset": 0, "total": self.0.len(), "has_more": true}
        }))
    }
}

#[tokio::test]
async fn discovery_matches_name_and_type_past_ten_receivers_on_a_server_ignoring_paging() {
    let server = MockServer::start().await;
    let mut all: Vec<Value> = (0..25)
        .map(|i| receiver(i, &format!("other-{i}"), "worker"))
        .collect();
    all.push(receiver(90, "mine", "other-type"));
    all.push(receiver(91, "mine", "worker"));
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(IgnoresPaging(all))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/receivers"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let id = client(&server)
        .discover_or_create_event_receiver("mine", "worker", "1.0.0", "d", json!({}))
        .await
        .unwrap();
    assert_eq!(id, "R091");
}

#[tokio::test]
async fn discovery_creates_once_and_takes_the_winner_on_already_exists() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"data": [], "pagination": {"has_more": false}})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/receivers"))
        .and(body_json(json!({"name": "svc", "type": "worker", "version": "1.0.0", "description": "d", "schema": {"type": "object"}})))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "receiver_creation_failed", "message": "Receiver svc already exists"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(IgnoresPaging(vec![receiver(7, "svc", "worker")]))
        .mount(&server)
        .await;
    let c = client(&server);
    // Concurrent callers share one discovery.
    let (a, b) = tokio::join!(
        c.discover_or_create_event_receiver(
            "svc",
            "worker",
            "1.0.0",
            "d",
            json!({"type": "object"})
        ),
        c.discover_or_create_event_receiver(
            "svc",
            "worker",
            "1.0.0",
            "d",
            json!({"type": "object"})
        ),
    );
    assert_eq!(a.unwrap(), "R007");
    assert_eq!(b.unwrap(), "R007");
}

#[tokio::test]
async fn list_sends_filters_and_paging() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .and(query_param("name", "a b"))
        .and(query_param("type", "t"))
        .and(query_param("limit", "10"))
        .and(query_param("offset", "20"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"data": [receiver(1, "a b", "t")]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut q = xzepr_consumer::client::ReceiverQuery::default();
    q.name = Some("a b".into());
    q.receiver_type = Some("t".into());
    q.limit = Some(10);
    q.offset = Some(20);
    let page = client(&server).list_event_receivers(&q).await.unwrap();
    assert_eq!(page.data[0].receiver_type, "t");
}

#[tokio::test]
async fn statuses_map_to_errors() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/R401"))
        .respond_with(ResponseTemplate::new(401).set_body_string("no"))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/R404"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/R400"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "validation_error", "message": "bad id", "field": "id"}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/R500"))
        .respond_with(ResponseTemplate::new(500).set_body_string("Invalid query: plain text"))
        .mount(&server)
        .await;
    let c = client(&server);
    let e = c.get_event_receiver("R401").await.unwrap_err();
    assert!(e.is_unauthorized() && !e.is_retryable(), "{e}");
    let e = c.get_event_receiver("R404").await.unwrap_err();
    assert!(e.is_not_found() && !e.is_retryable(), "{e}");
    match c.get_event_receiver("R400").await.unwrap_err() {
        ClientError::Api(api) => {
            assert_eq!(api.status, 400);
            assert_eq!(api.error.as_deref(), Some("validation_error"));
            assert_eq!(api.message.as_deref(), Some("bad id"));
            assert_eq!(api.field.as_deref(), Some("id"));
        }
        other => panic!("{other}"),
    }
    match c.get_event_receiver("R500").await.unwrap_err() {
        e @ ClientError::Api(_) => {
            assert!(e.is_retryable());
            let ClientError::Api(api) = e else {
                unreachable!()
            };
            assert_eq!(api.error, None);
            assert_eq!(api.body, "Invalid query: plain text");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_dead_server_is_a_retryable_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = XzeprClient::new(XzeprClientConfig::new(
        format!("http://127.0.0.1:{port}"),
        "t",
    ))
    .unwrap();
    let e = c.get_event_receiver("x").await.unwrap_err();
    assert!(
        matches!(e, ClientError::Connect(_)) && e.is_retryable(),
        "{e}"
    );
    // The cause is kept as the source, not flattened into the message.
    assert_eq!(e.to_string(), "connection failed");
    assert!(std::error::Error::source(&e).is_some());
    let line = xzepr_consumer::ErrorChain(&e).to_string();
    assert!(
        line.starts_with("connection failed: ") && line.len() > "connection failed: ".len(),
        "{line}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_the_contract_json_keeps_the_parse_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/x"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{not json"))
        .mount(&server)
        .await;
    let c = XzeprClient::new(XzeprClientConfig::new(server.uri(), "t")).unwrap();
    let e = c.get_event_receiver("x").await.unwrap_err();
    assert!(matches!(e, ClientError::Decode { .. }), "{e:?}");
    let source = std::error::Error::source(&e).expect("the parse error");
    assert!(
        source.downcast_ref::<serde_json::Error>().is_some(),
        "{source:?}"
    );
}

#[tokio::test]
async fn retry_after_is_read_from_429() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3"))
        .mount(&server)
        .await;
    let e = client(&server)
        .post_work_started("R1", "w", "n", "1", "p", "s", json!({}))
        .await
        .unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(3)));
}

#[tokio::test]
async fn among_several_existing_receivers_every_client_takes_the_earliest() {
    let server = MockServer::start().await;
    let at = |i: usize, name: &str, created_at: &str| {
        let mut r = receiver(i, name, "worker");
        r["created_at"] = json!(created_at);
        r
    };
    // The server's order is arbitrary; the winner is not.
    let all = vec![
        at(5, "svc", "2026-11-23T00:00:02Z"),
        at(9, "svc", "2026-11-23T00:00:01Z"),
        at(3, "svc", "2026-11-23T00:00:01Z"),
        at(1, "svc-other", "2026-11-23T00:00:00Z"),
    ];
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers"))
        .respond_with(IgnoresPaging(all))
        .mount(&server)
        .await;
    for _ in 0..2 {
        let id = client(&server)
            .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
            .await
            .unwrap();
        assert_eq!(id, "R003", "earliest created_at, then the smallest id");
    }
}

#[tokio::test]
async fn a_post_sent_in_full_without_an_answer_is_a_lost_response() {
    let server = MockServer::start().await;
    let slow = ResponseTemplate::new(200)
        .set_body_json(json!({"data": "E1"}))
        .set_delay(std::time::Duration::from_millis(500));
    Mock::given(method("POST"))
        .and(path("/api/v1/events"))
        .respond_with(slow.clone())
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/receivers/R1"))
        .respond_with(slow)
        .mount(&server)
        .await;
    let c = XzeprClient::new(
        XzeprClientConfig::new(server.uri(), "t")
            .with_request_timeout(std::time::Duration::from_millis(100)),
    )
    .unwrap();
    let e = c
        .post_work_started("R1", "w", "n", "1", "p", "s", json!({}))
        .await
        .unwrap_err();
    assert!(
        e.is_response_lost() && e.is_timeout() && e.is_retryable(),
        "{e}"
    );
    // A request without a body changes nothing: a plain timeout.
    let e = c.get_event_receiver("R1").await.unwrap_err();
    assert!(
        matches!(e, ClientError::Timeout(_)) && !e.is_response_lost(),
        "{e}"
    );
}

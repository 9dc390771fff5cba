use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn defaults_follow_the_contract() {
    let c = KafkaConsumerConfig::from_env_with("billing", env(&[])).unwrap();
    assert_eq!(c.brokers, "localhost:9092");
    assert_eq!(c.topics, vec!["xzepr.dev.events".to_owned()]);
    assert_eq!(c.group_id, "xzepr-consumer-billing");
    let rd = c.to_client_config().unwrap();
    assert_eq!(rd.get("enable.auto.commit"), Some("false"));
    assert_eq!(rd.get("enable.auto.offset.store"), Some("false"));
    assert_eq!(rd.get("security.protocol"), Some("PLAINTEXT"));
    assert_eq!(rd.get("fetch.wait.max.ms"), Some(FETCH_WAIT_MAX_MS));
    let rd = c
        .set("fetch.wait.max.ms", "500")
        .to_client_config()
        .unwrap();
    assert_eq!(
        rd.get("fetch.wait.max.ms"),
        Some("500"),
        "the user's value wins"
    );
}

#[test]
fn sasl_from_env_and_password_never_printed() {
    let c = KafkaConsumerConfig::from_env_with(
        "svc",
        env(&[
            ("XZEPR_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
            ("XZEPR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("XZEPR_KAFKA_SASL_USERNAME", "alice"),
            ("XZEPR_KAFKA_SASL_PASSWORD", "hunter2-secret"),
            ("XZEPR_KAFKA_GROUP_ID", "custom"),
        ]),
    )
    .unwrap()
    .set("sasl.password", "hunter2-secret");
    let rd = c.to_client_config().unwrap();
    assert_eq!(rd.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
    assert_eq!(rd.get("group.id"), Some("custom"));
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("alice"));
}

#[test]
fn errors_name_the_variable() {
    let err =
        KafkaConsumerConfig::from_env_with("s", env(&[("XZEPR_KAFKA_SECURITY_PROTOCOL", "TLS")]))
            .unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Invalid {
            name: "XZEPR_KAFKA_SECURITY_PROTOCOL",
            ..
        }
    ));
    let err =
        KafkaConsumerConfig::from_env_with("s", env(&[("XZEPR_KAFKA_SASL_MECHANISM", "GSSAPI")]))
            .unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Invalid {
            name: "XZEPR_KAFKA_SASL_MECHANISM",
            ..
        }
    ));
    let c = KafkaConsumerConfig::from_env_with(
        "s",
        env(&[
            ("XZEPR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("XZEPR_KAFKA_SASL_PASSWORD", "p"),
        ]),
    )
    .unwrap();
    let err = c.to_client_config().unwrap_err();
    assert!(
        err.to_string().contains("XZEPR_KAFKA_SASL_USERNAME"),
        "{err}"
    );
    let c = KafkaConsumerConfig::from_env_with(
        "s",
        env(&[
            ("XZEPR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("XZEPR_KAFKA_SASL_USERNAME", "u"),
        ]),
    )
    .unwrap();
    assert!(c
        .to_client_config()
        .unwrap_err()
        .to_string()
        .contains("XZEPR_KAFKA_SASL_PASSWORD"));
    // Both spellings of the certificate variable; an unreadable file is named.
    for var in [
        "XZEPR_KAFKA_SSL_CERT_LOCATION",
        "XZEPR_KAFKA_SSL_CERTIFICATE_LOCATION",
    ] {
        let c = KafkaConsumerConfig::from_env_with(
            "s",
            env(&[
                ("XZEPR_KAFKA_SECURITY_PROTOCOL", "SSL"),
                (var, "/nonexistent/cert.pem"),
            ]),
        )
        .unwrap();
        let err = c.to_client_config().unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnreadableFile { name, .. } if name.contains("XZEPR_KAFKA_SSL_CERT_LOCATION")),
            "{err}"
        );
    }
    let mut c = KafkaConsumerConfig::new("b:9092", "t", "s");
    c.auto_offset_reset = "smallest".into();
    assert!(matches!(
        c.to_client_config(),
        Err(ConfigError::Invalid {
            name: "auto_offset_reset",
            ..
        })
    ));
}

#[test]
fn owned_properties_are_refused_by_name() {
    let base = KafkaConsumerConfig::new("b:9092", "t", "s");
    for (key, value) in [
        ("enable.auto.commit", "true"),
        (" Enable.Auto.Commit ", "true"),
        ("auto.commit.enable", "true"),
        ("enable.auto.offset.store", "true"),
        ("isolation.level", "read_uncommitted"),
        ("group.id", "other"),
        ("bootstrap.servers", "elsewhere:9092"),
    ] {
        let err = base.clone().set(key, value).to_client_config().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Reserved { property, .. } if property == key),
            "{key}: {err}"
        );
        assert!(err.to_string().contains(key.trim()), "{err}");
    }
    let rd = base
        .set("heartbeat.interval.ms", "100")
        .to_client_config()
        .unwrap();
    assert_eq!(rd.get("heartbeat.interval.ms"), Some("100"));
    assert_eq!(rd.get("isolation.level"), Some("read_committed"));
}

#[test]
fn builder_combines_sasl_and_tls() {
    let ca = tempfile::NamedTempFile::new().unwrap();
    let c = KafkaConsumerConfig::new("b:9092", "t", "s")
        .with_ssl(ca.path().to_str().unwrap())
        .with_sasl(SaslMechanism::Plain, "u", "p")
        .with_topic("t2");
    assert_eq!(c.security_protocol, Some(SecurityProtocol::SaslSsl));
    assert_eq!(c.topics.len(), 2);
    let rd = c.to_client_config().unwrap();
    assert_eq!(rd.get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(rd.get("sasl.mechanism"), Some("PLAIN"));
}

#[test]
fn static_membership_from_env_checked_and_owned() {
    let c = KafkaConsumerConfig::from_env_with("s", env(&[])).unwrap();
    assert_eq!(c.group_instance_id, None);
    assert_eq!(c.to_client_config().unwrap().get("group.instance.id"), None);
    let c = KafkaConsumerConfig::from_env_with(
        "s",
        env(&[("XZEPR_KAFKA_GROUP_INSTANCE_ID", " orders-7f9c-2 ")]),
    )
    .unwrap();
    assert_eq!(c.group_instance_id.as_deref(), Some("orders-7f9c-2"));
    let rd = c.to_client_config().unwrap();
    assert_eq!(rd.get("group.instance.id"), Some("orders-7f9c-2"));
    for bad in ["", "a b", "pod/1", &"x".repeat(250)] {
        let err = KafkaConsumerConfig::new("b:9092", "t", "s")
            .with_group_instance_id(bad)
            .to_client_config()
            .unwrap_err();
        assert!(
            err.to_string().contains("XZEPR_KAFKA_GROUP_INSTANCE_ID"),
            "{bad:?}: {err}"
        );
    }
    for key in ["group.instance.id", "partition.assignment.strategy"] {
        let err = KafkaConsumerConfig::new("b:9092", "t", "s")
            .set(key, "x")
            .to_client_config()
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Reserved { property, .. } if property == key),
            "{err}"
        );
    }
}

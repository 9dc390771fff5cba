//! `KafkaConsumerConfig`: read from the environment by the core's own
//! `from_env`, and passed back to it as a flat dict of the dataclass's fields.

use std::collections::HashMap;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use xzepr_consumer::config::{KafkaConsumerConfig, SaslMechanism, SecurityProtocol};

/// The Python dataclass, flattened (`KafkaConsumerConfig._to_native`).
#[derive(Debug, FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct KafkaArgs {
    brokers: String,
    topic: String,
    service_name: String,
    group_id: String,
    group_instance_id: Option<String>,
    security_protocol: String,
    sasl_mechanism: Option<String>,
    sasl_username: Option<String>,
    sasl_password: Option<String>,
    ssl_ca_location: Option<String>,
    ssl_certificate_location: Option<String>,
    ssl_key_location: Option<String>,
    auto_offset_reset: String,
    session_timeout_ms: u64,
    extra: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The core's config; checked later by the core (`to_client_config`).
    pub(crate) fn to_config(&self, py: Python<'_>) -> PyResult<KafkaConsumerConfig> {
        let invalid = |name: &str, value: &str, expected: &str| {
            crate::errors::config_error(
                py,
                format!("invalid value {value:?} for `{name}`: expected {expected}"),
            )
        };
        let mut c = KafkaConsumerConfig::new(&self.brokers, &self.topic, &self.service_name)
            .with_group_id(&self.group_id);
        c.group_instance_id.clone_from(&self.group_instance_id);
        c.security_protocol = Some(match self.security_protocol.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => SecurityProtocol::Plaintext,
            "SSL" => SecurityProtocol::Ssl,
            "SASL_PLAINTEXT" => SecurityProtocol::SaslPlaintext,
            "SASL_SSL" => SecurityProtocol::SaslSsl,
            other => {
                return Err(invalid(
                    "security_protocol",
                    other,
                    "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
                ))
            }
        });
        if let Some(m) = &self.sasl_mechanism {
            c.sasl_mechanism = match m.to_ascii_uppercase().as_str() {
                "PLAIN" => SaslMechanism::Plain,
                "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
                "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
                other => {
                    return Err(invalid(
                        "sasl_mechanism",
                        other,
                        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                    ))
                }
            };
        }
        c.sasl_username.clone_from(&self.sasl_username);
        c.sasl_password.clone_from(&self.sasl_password);
        c.ssl_ca_location = self.ssl_ca_location.as_ref().map(Into::into);
        c.ssl_certificate_location = self.ssl_certificate_location.as_ref().map(Into::into);
        c.ssl_key_location = self.ssl_key_location.as_ref().map(Into::into);
        c.auto_offset_reset.clone_from(&self.auto_offset_reset);
        c.session_timeout = Duration::from_millis(self.session_timeout_ms);
        c.extra.clone_from(&self.extra);
        Ok(c)
    }
}

/// Reads the `XZEPR_KAFKA_*` variables from `env` with the core's `from_env`,
/// and returns the dataclass's fields.
#[pyfunction]
pub(crate) fn kafka_config_from_env<'py>(
    py: Python<'py>,
    service_name: &str,
    env: HashMap<String, String>,
) -> PyResult<Bound<'py, PyDict>> {
    let c = KafkaConsumerConfig::from_env_with(service_name, |k| env.get(k).cloned())
        .map_err(|e| crate::errors::config_error(py, e.to_string()))?;
    let d = PyDict::new(py);
    d.set_item("brokers", &c.brokers)?;
    d.set_item("topic", c.topics.first().cloned().unwrap_or_default())?;
    d.set_item("service_name", &c.service_name)?;
    d.set_item("group_id", &c.group_id)?;
    d.set_item("group_instance_id", &c.group_instance_id)?;
    d.set_item(
        "security_protocol",
        c.security_protocol.unwrap_or_default().as_str(),
    )?;
    d.set_item("sasl_mechanism", c.sasl_mechanism.as_str())?;
    d.set_item("sasl_username", &c.sasl_username)?;
    d.set_item("sasl_password", &c.sasl_password)?;
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    d.set_item("ssl_ca_location", path(&c.ssl_ca_location))?;
    d.set_item(
        "ssl_certificate_location",
        path(&c.ssl_certificate_location),
    )?;
    d.set_item("ssl_key_location", path(&c.ssl_key_location))?;
    d.set_item("auto_offset_reset", &c.auto_offset_reset)?;
    d.set_item(
        "session_timeout_ms",
        u64::try_from(c.session_timeout.as_millis()).unwrap_or(u64::MAX),
    )?;
    Ok(d)
}

/// Checks a configuration as the consumer will (`to_client_config`), and
/// returns librdkafka's properties, the password redacted.
#[pyfunction]
pub(crate) fn check_kafka_config(
    py: Python<'_>,
    config: KafkaArgs,
) -> PyResult<Vec<(String, String)>> {
    let c = config.to_config(py)?;
    let client = c
        .to_client_config()
        .map_err(|e| crate::errors::config_error(py, e.to_string()))?;
    let mut props: Vec<(String, String)> = client
        .config_map()
        .iter()
        .map(|(k, v)| {
            let secret = k.contains("password");
            let v: &str = if secret { "<redacted>" } else { v };
            (k.to_string(), v.to_owned())
        })
        .collect();
    props.sort();
    Ok(props)
}

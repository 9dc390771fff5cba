//! Kafka consumer configuration: programmatic, or from the `XZEPR_KAFKA_*`
//! environment of the XZepr contract. Values are checked when the consumer is
//! built ([`KafkaConsumerConfig::to_client_config`]), each error naming the field
//! or variable at fault. The SASL password never appears in `Debug` output.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;

pub mod duration;

/// Configuration errors, each naming the field or environment variable.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required value is absent.
    #[error("missing required setting `{name}`")]
    Missing {
        /// The field or variable.
        name: &'static str,
    },
    /// A value is not one of the accepted ones.
    #[error("invalid value {value:?} for `{name}`: expected {expected}")]
    Invalid {
        /// The field or variable.
        name: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A value XZepr requires to be non-empty is empty (or blank).
    #[error("`{name}` must not be empty: XZepr rejects (or misnames) records without it")]
    Empty {
        /// The field.
        name: &'static str,
    },
    /// An extra librdkafka property the library sets itself and relies on:
    /// overriding it would undo a guarantee (see [`OWNED_PROPERTIES`]).
    #[error(
        "librdkafka property `{property}` is owned by the library and cannot be set: {reason}"
    )]
    Reserved {
        /// The property as given.
        property: String,
        /// What it guards, and what to use instead.
        reason: &'static str,
    },
    /// A certificate or key file cannot be read.
    #[error("`{name}`: cannot read {path:?}")]
    UnreadableFile {
        /// The field or variable.
        name: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error (shared: the error is `Clone`).
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
}

/// How the consumer talks to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL over plain TCP.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    fn parse(name: &'static str, value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Ok(Self::Plaintext),
            "SSL" => Ok(Self::Ssl),
            "SASL_PLAINTEXT" => Ok(Self::SaslPlaintext),
            "SASL_SSL" => Ok(Self::SaslSsl),
            _ => Err(ConfigError::Invalid {
                name,
                value: value.to_owned(),
                expected: "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
            }),
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// The SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// `PLAIN`.
    Plain,
    /// `SCRAM-SHA-256` (the contract's default).
    #[default]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    fn parse(name: &'static str, value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_uppercase().as_str() {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            _ => Err(ConfigError::Invalid {
                name,
                value: value.to_owned(),
                expected: "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
            }),
        }
    }
}

/// Kafka consumer settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaConsumerConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Topics to consume (the contract's default: `xzepr.dev.events`).
    pub topics: Vec<String>,
    /// Consumer group; defaults to `xzepr-consumer-{service_name}`.
    pub group_id: String,
    /// Static group membership (KIP-345): this instance's stable name in the
    /// group, e.g. its pod name, from `XZEPR_KAFKA_GROUP_INSTANCE_ID`. Default
    /// `None` (dynamic membership). With it, a member that restarts inside the
    /// session timeout takes its own partitions back without a rebalance, and
    /// a member that stops does not leave the group: its partitions wait out
    /// the session timeout instead of moving at once. Each running instance
    /// needs its own name; a second consumer with the same one fences the
    /// first. At most 249 characters of `a-z A-Z 0-9 . _ -` (the broker's rule).
    pub group_instance_id: Option<String>,
    /// The service's name.
    pub service_name: String,
    /// Transport security; set from the SASL/SSL helpers or the environment.
    pub security_protocol: Option<SecurityProtocol>,
    /// SASL mechanism (default SCRAM-SHA-256 when SASL is used).
    pub sasl_mechanism: SaslMechanism,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password (never printed).
    pub sasl_password: Option<String>,
    /// CA certificate file (PEM).
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate file for mTLS (PEM).
    pub ssl_certificate_location: Option<PathBuf>,
    /// Client key file for mTLS (PEM).
    pub ssl_key_location: Option<PathBuf>,
    /// Where a group with no committed offset starts: `earliest` (default) or `latest`.
    pub auto_offset_reset: String,
    /// Session timeout: the broker evicts a consumer silent for this long.
    /// Default 30 s (librdkafka's default is 45 s; the plan used 30 s).
    pub session_timeout: Duration,
    /// Any other librdkafka property, applied last (so it overrides ours),
    /// except the ones in [`OWNED_PROPERTIES`], which are refused.
    pub extra: Vec<(String, String)>,
}

/// librdkafka properties the library sets and relies on, refused in
/// [`KafkaConsumerConfig::extra`] ([`ConfigError::Reserved`] at
/// [`KafkaConsumerConfig::to_client_config`]), with the reason:
///
/// - `enable.auto.commit` (and its alias `auto.commit.enable`),
///   `enable.auto.offset.store`: the offset tracker commits only finished,
///   acknowledged work; librdkafka committing on its own turns at-least-once into
///   at-most-once.
/// - `isolation.level`: pinned to `read_committed`, so records of aborted
///   transactions are never handled and reported.
/// - `group.id`, `group.instance.id`, `bootstrap.servers` (and its alias
///   `metadata.broker.list`): set from their fields (`group_id`,
///   `group_instance_id`, `brokers`), which the rest of the library also
///   reads; a second value would disagree with them silently.
/// - `partition.assignment.strategy`: set from the source's
///   [`assignment`](crate::source::SourceOptions::assignment), which also
///   decides how a revoke drains.
///
/// Every other property may be set, and wins over the library's default.
pub const OWNED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "the library commits only finished, acknowledged offsets (at-least-once)",
    ),
    (
        "auto.commit.enable",
        "the library commits only finished, acknowledged offsets (at-least-once)",
    ),
    (
        "enable.auto.offset.store",
        "the library stores only finished, acknowledged offsets (at-least-once)",
    ),
    (
        "isolation.level",
        "pinned to read_committed: records of aborted transactions are never handled",
    ),
    (
        "group.id",
        "set the `group_id` field (XZEPR_KAFKA_GROUP_ID) instead",
    ),
    (
        "group.instance.id",
        "set the `group_instance_id` field (XZEPR_KAFKA_GROUP_INSTANCE_ID) instead",
    ),
    (
        "partition.assignment.strategy",
        "set the `assignment` setting (eager or cooperative) instead: the source drains on revoke by it",
    ),
    (
        "bootstrap.servers",
        "set the `brokers` field (XZEPR_KAFKA_BROKERS) instead",
    ),
    (
        "metadata.broker.list",
        "set the `brokers` field (XZEPR_KAFKA_BROKERS) instead",
    ),
];

/// librdkafka's `fetch.wait.max.ms`, lowered from its 500 ms default. The source
/// stage pauses a partition whose queue is full, and a resumed partition is not
/// fetched until the fetch already in flight returns; when the partitions still
/// fetching have no new data, the broker holds that fetch this long. 100 ms is
/// shorter than the work a resumed partition still has queued for any handler
/// slower than ~15,000 events/s per queue (the resume watermark leaves ~1,500
/// messages ahead), so the stall stays hidden; an idle consumer pays ten empty
/// fetches a second per broker for it. Override with
/// `KafkaConsumerConfig::set("fetch.wait.max.ms", ..)`.
pub const FETCH_WAIT_MAX_MS: &str = "100";

/// librdkafka's `fetch.queue.backoff.ms`, lowered from its 1,000 ms default.
/// When the pipeline's buffers are over budget the poll thread stops polling
/// for a moment, librdkafka's own queue reaches its limit
/// (`queued.max.messages.kbytes`), and librdkafka then waits this long before it
/// fetches again: with the default, every such hiccup stalled the consumer for
/// a whole second (measured: ~1 s with nothing polled, in a run of ~1.5 s).
/// 10 ms re-checks the queue often enough never to run dry, at the cost of a
/// few cheap checks while it stays full. Override with
/// `KafkaConsumerConfig::set("fetch.queue.backoff.ms", ..)`.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

impl fmt::Debug for KafkaConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: Vec<_> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("password") || k.contains("secret");
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConsumerConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("group_instance_id", &self.group_instance_id)
            .field("service_name", &self.service_name)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("session_timeout", &self.session_timeout)
            .field("extra", &redacted)
            .finish()
    }
}

impl KafkaConsumerConfig {
    /// Settings for `service_name` consuming `topic` from `brokers`, in group
    /// `xzepr-consumer-{service_name}`.
    pub fn new(brokers: &str, topic: &str, service_name: &str) -> Self {
        KafkaConsumerConfig {
            brokers: brokers.to_owned(),
            topics: vec![topic.to_owned()],
            group_id: format!("xzepr-consumer-{service_name}"),
            group_instance_id: None,
            service_name: service_name.to_owned(),
            security_protocol: None,
            sasl_mechanism: SaslMechanism::default(),
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            auto_offset_reset: "earliest".to_owned(),
            session_timeout: Duration::from_secs(30),
            extra: Vec::new(),
        }
    }

    /// Overrides the consumer group.
    #[must_use]
    pub fn with_group_id(mut self, group_id: &str) -> Self {
        self.group_id = group_id.to_owned();
        self
    }

    /// Static membership under `instance_id` (see
    /// [`KafkaConsumerConfig::group_instance_id`]).
    #[must_use]
    pub fn with_group_instance_id(mut self, instance_id: &str) -> Self {
        self.group_instance_id = Some(instance_id.to_owned());
        self
    }

    /// Consumes one more topic.
    #[must_use]
    pub fn with_topic(mut self, topic: &str) -> Self {
        self.topics.push(topic.to_owned());
        self
    }

    /// SASL authentication with `mechanism`. Keeps TLS if it was configured
    /// (SASL_SSL), else uses SASL_PLAINTEXT.
    #[must_use]
    pub fn with_sasl(mut self, mechanism: SaslMechanism, username: &str, password: &str) -> Self {
        let tls = self
            .security_protocol
            .is_some_and(SecurityProtocol::uses_tls);
        self.security_protocol = Some(if tls {
            SecurityProtocol::SaslSsl
        } else {
            SecurityProtocol::SaslPlaintext
        });
        self.sasl_mechanism = mechanism;
        self.sasl_username = Some(username.to_owned());
        self.sasl_password = Some(password.to_owned());
        self
    }

    /// SASL/SCRAM-SHA-256 authentication (the plan's helper).
    #[must_use]
    pub fn with_sasl_scram_sha256(self, username: &str, password: &str) -> Self {
        self.with_sasl(SaslMechanism::ScramSha256, username, password)
    }

    /// TLS with a CA file. Keeps SASL if it was configured (SASL_SSL).
    #[must_use]
    pub fn with_ssl(mut self, ca_location: &str) -> Self {
        let sasl = self
            .security_protocol
            .is_some_and(SecurityProtocol::uses_sasl);
        self.security_protocol = Some(if sasl {
            SecurityProtocol::SaslSsl
        } else {
            SecurityProtocol::Ssl
        });
        self.ssl_ca_location = Some(ca_location.into());
        self
    }

    /// A client certificate and key for mutual TLS.
    #[must_use]
    pub fn with_client_certificate(mut self, certificate: &str, key: &str) -> Self {
        self.ssl_certificate_location = Some(certificate.into());
        self.ssl_key_location = Some(key.into());
        self
    }

    /// Sets any librdkafka property (applied after ours, so it wins). One of
    /// [`OWNED_PROPERTIES`] is refused when the configuration is checked
    /// ([`KafkaConsumerConfig::to_client_config`]).
    #[must_use]
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Reads the contract's `XZEPR_KAFKA_*` variables from the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable with a bad value.
    pub fn from_env(service_name: &str) -> Result<Self, ConfigError> {
        Self::from_env_with(service_name, |name| std::env::var(name).ok())
    }

    /// As [`KafkaConsumerConfig::from_env`], reading variables through `lookup`
    /// (tests, or configuration from elsewhere).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable with a bad value.
    pub fn from_env_with(
        service_name: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let brokers = get("XZEPR_KAFKA_BROKERS").unwrap_or_else(|| "localhost:9092".to_owned());
        let topic = get("XZEPR_KAFKA_TOPIC").unwrap_or_else(|| "xzepr.dev.events".to_owned());
        let mut c = Self::new(&brokers, &topic, service_name);
        if let Some(group) = get("XZEPR_KAFKA_GROUP_ID") {
            c.group_id = group;
        }
        c.group_instance_id = get("XZEPR_KAFKA_GROUP_INSTANCE_ID").map(|v| v.trim().to_owned());
        if let Some(p) = get("XZEPR_KAFKA_SECURITY_PROTOCOL") {
            c.security_protocol = Some(SecurityProtocol::parse(
                "XZEPR_KAFKA_SECURITY_PROTOCOL",
                &p,
            )?);
        }
        if let Some(m) = get("XZEPR_KAFKA_SASL_MECHANISM") {
            c.sasl_mechanism = SaslMechanism::parse("XZEPR_KAFKA_SASL_MECHANISM", &m)?;
        }
        c.sasl_username = get("XZEPR_KAFKA_SASL_USERNAME");
        c.sasl_password = lookup("XZEPR_KAFKA_SASL_PASSWORD");
        c.ssl_ca_location = get("XZEPR_KAFKA_SSL_CA_LOCATION").map(PathBuf::from);
        c.ssl_certificate_location = get("XZEPR_KAFKA_SSL_CERT_LOCATION")
            .or_else(|| get("XZEPR_KAFKA_SSL_CERTIFICATE_LOCATION"))
            .map(PathBuf::from);
        c.ssl_key_location = get("XZEPR_KAFKA_SSL_KEY_LOCATION").map(PathBuf::from);
        Ok(c)
    }

    /// Checks the settings and turns them into librdkafka's, with our commit
    /// discipline: `enable.auto.commit=false` and `enable.auto.offset.store=false`
    /// (the offset tracker decides what is committed).
    ///
    /// # Errors
    /// - [`ConfigError::Missing`]: no brokers, topic or group; a SASL protocol
    ///   without user name or password;
    /// - [`ConfigError::Invalid`]: an `auto_offset_reset` other than earliest/latest,
    ///   a `group_instance_id` that is blank, too long or has a character the
    ///   broker refuses;
    /// - [`ConfigError::Reserved`]: an extra property in [`OWNED_PROPERTIES`];
    /// - [`ConfigError::UnreadableFile`]: a certificate or key file that cannot be read.
    pub fn to_client_config(&self) -> Result<ClientConfig, ConfigError> {
        for (key, _) in &self.extra {
            let k = key.trim().to_ascii_lowercase();
            if let Some((_, reason)) = OWNED_PROPERTIES.iter().find(|(owned, _)| *owned == k) {
                return Err(ConfigError::Reserved {
                    property: key.clone(),
                    reason,
                });
            }
        }
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::Missing { name: "brokers" });
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::Missing { name: "topics" });
        }
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::Missing { name: "group_id" });
        }
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(ConfigError::Invalid {
                name: "auto_offset_reset",
                value: self.auto_offset_reset.clone(),
                expected: "earliest or latest",
            });
        }
        if let Some(id) = &self.group_instance_id {
            check_instance_id(id)?;
        }
        let protocol = self.security_protocol.unwrap_or_default();
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("client.id", &self.service_name)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", &self.auto_offset_reset)
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("security.protocol", protocol.as_str());
        if let Some(id) = &self.group_instance_id {
            c.set("group.instance.id", id);
        }
        if protocol.uses_sasl() {
            let user = self.sasl_username.as_deref().filter(|u| !u.is_empty());
            let user = user.ok_or(ConfigError::Missing {
                name: "sasl_username (XZEPR_KAFKA_SASL_USERNAME)",
            })?;
            let password = self.sasl_password.as_deref().ok_or(ConfigError::Missing {
                name: "sasl_password (XZEPR_KAFKA_SASL_PASSWORD)",
            })?;
            c.set("sasl.mechanism", self.sasl_mechanism.as_str())
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        for (name, path, key) in [
            (
                "ssl_ca_location (XZEPR_KAFKA_SSL_CA_LOCATION)",
                &self.ssl_ca_location,
                "ssl.ca.location",
            ),
            (
                "ssl_certificate_location (XZEPR_KAFKA_SSL_CERT_LOCATION)",
                &self.ssl_certificate_location,
                "ssl.certificate.location",
            ),
            (
                "ssl_key_location (XZEPR_KAFKA_SSL_KEY_LOCATION)",
                &self.ssl_key_location,
                "ssl.key.location",
            ),
        ] {
            if let Some(path) = path {
                std::fs::File::open(path).map_err(|e| ConfigError::UnreadableFile {
                    name,
                    path: path.clone(),
                    source: std::sync::Arc::new(e),
                })?;
                c.set(key, path.to_string_lossy());
            }
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        Ok(c)
    }
}

/// The broker's rule for a `group.instance.id` (as for topic names): 1 to 249
/// characters of `a-z A-Z 0-9 . _ -`. Checked here so a bad name fails at
/// build, naming the variable, rather than as a join error in the poll loop.
fn check_instance_id(id: &str) -> Result<(), ConfigError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > 249 || !id.chars().all(legal) {
        return Err(ConfigError::Invalid {
            name: "group_instance_id (XZEPR_KAFKA_GROUP_INSTANCE_ID)",
            value: id.to_owned(),
            expected: "1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! Arguments `run` and `tail` share: where Kafka is, which types are wanted,
//! durations, and URLs shown without their credentials.

use std::time::Duration;

use xzepr_consumer::config::{ConfigError, KafkaConsumerConfig};
use xzepr_consumer::dispatch::TypeFilter;

/// Kafka connection flags. Each overrides its `XZEPR_KAFKA_*` variable; the
/// rest (security protocol, SASL, TLS files) come from the environment only, so
/// a password is never on a command line.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers [default: $XZEPR_KAFKA_BROKERS, else localhost:9092].
    #[arg(long, value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,
    /// Topic to read; repeat for more [default: $XZEPR_KAFKA_TOPIC, else
    /// xzepr.dev.events].
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
}

impl KafkaArgs {
    /// `KafkaConsumerConfig::from_env(service)` with these flags applied.
    pub fn config(&self, service: &str) -> Result<KafkaConsumerConfig, ConfigError> {
        let mut c = KafkaConsumerConfig::from_env(service)?;
        if let Some(b) = &self.brokers {
            c.brokers.clone_from(b);
        }
        if !self.topics.is_empty() {
            c.topics.clone_from(&self.topics);
        }
        Ok(c)
    }
}

/// The `XZEPR_KAFKA_*` variable `name`, or `default` when it is unset or blank
/// (as `KafkaConsumerConfig::from_env` reads it), for commands that need no
/// consumer configuration.
pub fn kafka_env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The filter for `--type` values: a value with `*` or `?` is a glob, any other
/// a prefix; none accepts every type.
pub fn type_filter(patterns: &[String]) -> TypeFilter {
    patterns
        .iter()
        .fold(TypeFilter::any(), |f, p| f.pattern(p.as_str()))
}

/// `500ms`, `30s`, `5m`, `1h`, or bare seconds (`30`); more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match xzepr_consumer::config::duration::parse(s)? {
        d if d.is_zero() => Err(format!("{:?}: must be more than zero", s.trim())),
        d => Ok(d),
    }
}

/// `url` with any `user:password@` replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn types_are_prefixes_or_globs() {
        let f = type_filter(&["deployment.".into(), "*.failed".into()]);
        assert!(f.accepts("deployment.started"));
        assert!(f.accepts("build.failed"));
        assert!(!f.accepts("build.completed"));
        assert!(type_filter(&[]).accepts("anything"));
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("http://alice:s3cret@localhost:8080/x@y"),
            "http://<redacted>@localhost:8080/x@y"
        );
        assert_eq!(
            redact_url("http://localhost:8080/"),
            "http://localhost:8080/"
        );
    }
}

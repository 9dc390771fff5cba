//! The source stage's error.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;

/// Source-stage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused to create or subscribe the consumer.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A broker rejected our credentials (fatal: not retried forever).
    #[error("authentication failed: {reason}")]
    Authentication {
        /// librdkafka's description.
        reason: String,
    },
    /// The offsets of `start_from`'s time could not be looked up for newly
    /// assigned partitions without a committed offset: they stay paused (none
    /// of their events runs) and the source stops, rather than start them
    /// anywhere else.
    #[error("start_from {at}: cannot look up the partitions' offsets at that time")]
    StartFrom {
        /// The time, RFC 3339.
        at: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// An option is out of range.
    #[error("invalid source option `{field}`: {reason}")]
    InvalidOption {
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// The executor stopped taking jobs (its workers are gone) while messages
    /// still came. The job that found it closed is dropped unfinished, so nothing
    /// at or after it in its partition is committed.
    #[error("the executor stopped: its workers are gone")]
    WorkerStopped,
    /// The poll thread panicked.
    #[error("the poll thread panicked: {0}")]
    Panicked(String),
    /// The poll thread could not be started.
    #[error("cannot start the poll thread: {0}")]
    Spawn(#[from] std::io::Error),
}

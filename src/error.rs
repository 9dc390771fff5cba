//! The crate-level error: one variant per stage, each wrapping that stage's own enum.

/// Any error this crate returns, wrapping the error of the stage it came from.
///
/// Each stage has its own `#[non_exhaustive]` enum with structured fields; match on
/// the stage variant, then on the stage's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message could not be decoded as a CloudEvent.
    #[error(transparent)]
    Decode(#[from] crate::decode::Error),
    /// A setting is missing or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The Kafka source failed.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// A call to the XZepr API failed.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// A lifecycle post failed for good.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// The pipeline's threads failed.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// The idempotency store failed.
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::Error),
    /// The offset tracker refused an operation.
    #[error(transparent)]
    Offsets(#[from] crate::offsets::Error),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn error_is_send_sync() {
        assert_send_sync::<Error>();
    }
}

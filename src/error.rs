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
    /// Reading or moving a group's offsets from outside it failed.
    #[error(transparent)]
    Admin(#[from] crate::offsets::admin::AdminError),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line (`outer: cause: root`), for logs and
/// messages; a cause whose text is already in the line before it is left out.
///
/// ```
/// # use xzepr_consumer::ErrorChain;
/// let io = std::io::Error::other("refused");
/// let e = xzepr_consumer::client::ClientError::Connect(Box::new(io));
/// assert_eq!(ErrorChain(&e).to_string(), "connection failed: refused");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let more = c.to_string();
            if !line.contains(&more) {
                line.push_str(": ");
                line.push_str(&more);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn error_is_send_sync() {
        assert_send_sync::<Error>();
    }
}

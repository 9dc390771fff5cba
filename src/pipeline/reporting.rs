//! Reporting as part of the run: the service's receiver found by name and
//! type (or created), the reporter started with the pipeline and drained
//! after it, so no caller writes that sequence again.

use std::time::Duration;

use serde_json::Value;

use super::sink::WorkTemplate;
use crate::client::XzeprClient;
use crate::config::ConfigError;
use crate::report::{Reporter, ReporterConfig, ReporterTask};

/// How long the posts still queued when the pipeline stopped may take to be
/// sent. Default 30 s: at XZepr's ~5.5 ms a post and the reporter's 128
/// posting tasks, a full default queue (4,096) is sent in well under it;
/// what is not sent by then was not committed and is replayed.
pub const DEFAULT_REPORT_DRAIN: Duration = Duration::from_secs(30);

/// Where and as what the pipeline reports its work
/// ([`PipelineBuilder::report_to`](super::PipelineBuilder::report_to)): the
/// XZepr client, the service's event receiver (found by name and type, or
/// created) and the work's name, version and package.
#[derive(Clone)]
#[must_use]
pub struct Reporting {
    client: XzeprClient,
    pub(super) receiver_name: String,
    pub(super) receiver_type: String,
    receiver_version: String,
    receiver_description: String,
    receiver_schema: Value,
    pub(super) work_name: String,
    pub(super) work_version: String,
    pub(super) package: String,
    reporter: ReporterConfig,
    pub(super) drain_timeout: Duration,
}

impl std::fmt::Debug for Reporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the token: never printed.
        f.debug_struct("Reporting")
            .field("receiver_name", &self.receiver_name)
            .field("receiver_type", &self.receiver_type)
            .field("work_name", &self.work_name)
            .field("work_version", &self.work_version)
            .field("package", &self.package)
            .finish_non_exhaustive()
    }
}

impl Reporting {
    /// Reports for `service` through `client`: receiver `service` of type
    /// `worker`, version 1.0.0; work `service` version 1.0.0; package
    /// `service`.
    pub fn new(client: XzeprClient, service: &str) -> Self {
        Reporting {
            client,
            receiver_name: service.to_owned(),
            receiver_type: "worker".to_owned(),
            receiver_version: "1.0.0".to_owned(),
            receiver_description: format!("{service}: events handled by xzepr-consumer"),
            receiver_schema: serde_json::json!({"type": "object"}),
            work_name: service.to_owned(),
            work_version: "1.0.0".to_owned(),
            package: service.to_owned(),
            reporter: ReporterConfig::default(),
            drain_timeout: DEFAULT_REPORT_DRAIN,
        }
    }

    /// The receiver's name and type (what it is found by).
    pub fn receiver(mut self, name: impl Into<String>, receiver_type: impl Into<String>) -> Self {
        self.receiver_name = name.into();
        self.receiver_type = receiver_type.into();
        self
    }

    /// The receiver's version, description and schema, used when it is created.
    pub fn receiver_details(
        mut self,
        version: impl Into<String>,
        description: impl Into<String>,
        schema: Value,
    ) -> Self {
        self.receiver_version = version.into();
        self.receiver_description = description.into();
        self.receiver_schema = schema;
        self
    }

    /// The work's name (posts are `{name}.started` …) and version (also the
    /// release).
    pub fn work(mut self, name: impl Into<String>, version: impl Into<String>) -> Self {
        self.work_name = name.into();
        self.work_version = version.into();
        self
    }

    /// The posts' `package` (the service's name).
    pub fn package(mut self, package: impl Into<String>) -> Self {
        self.package = package.into();
        self
    }

    /// The reporter's queue, retries and breaker. Its concurrency is the
    /// pipeline's [`PipelineConfig::report_concurrency`](super::PipelineConfig::report_concurrency).
    pub fn reporter(mut self, config: ReporterConfig) -> Self {
        self.reporter = config;
        self
    }

    /// How long queued posts may take once the pipeline stopped (default
    /// [`DEFAULT_REPORT_DRAIN`]).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Checks the fields every post carries (at `build`).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("receiver_name", &self.receiver_name),
            ("receiver_type", &self.receiver_type),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::Empty { name });
            }
        }
        crate::report::validate_work_fields(
            &self.work_name,
            &self.work_version,
            &self.work_version,
            &self.package,
        )
    }

    /// Finds or creates the receiver and starts the reporter, its posts
    /// under `concurrency`.
    pub(super) async fn connect(
        &self,
        concurrency: crate::flow_control::Concurrency,
    ) -> Result<(Reporter, ReporterTask, WorkTemplate), crate::Error> {
        let receiver = self
            .client
            .discover_or_create_event_receiver(
                &self.receiver_name,
                &self.receiver_type,
                &self.receiver_version,
                &self.receiver_description,
                self.receiver_schema.clone(),
            )
            .await
            .map_err(|source| super::PipelineError::Discovery {
                name: self.receiver_name.clone(),
                receiver_type: self.receiver_type.clone(),
                source,
            })?;
        tracing::info!(
            receiver = %receiver,
            name = %self.receiver_name,
            work = %self.work_name,
            "Reporting to XZepr."
        );
        let mut config = self.reporter.clone();
        config.concurrency = concurrency;
        let (reporter, task) = Reporter::start(self.client.clone(), config);
        let work = WorkTemplate::new(
            receiver,
            &*self.work_name,
            &*self.work_version,
            &*self.package,
        );
        Ok((reporter, task, work))
    }
}

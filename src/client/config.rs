//! The client's settings, from code or from `XZEPR_API_URL`/`XZEPR_API_TOKEN`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{ClientError, TransportConfig};

/// Default [`XzeprClientConfig::request_timeout`]: 30 s. XZepr answers in ~5 ms,
/// but while its own Kafka is unreachable `POST /api/v1/events` takes 10–14 s and
/// *still records the event*: a shorter timeout followed by a retry records it
/// twice. 30 s covers that slow-but-working server with room to spare.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`XzeprClientConfig::connect_timeout`]: 5 s. Connecting is cheap and
/// unrelated to XZepr's slowness; a server that does not accept a connection this
/// fast is down, and failing the attempt early (nothing was sent, so nothing can
/// be duplicated) lets the retry and the breaker take over.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of an [`XzeprClient`](super::XzeprClient).
#[derive(Clone)]
#[non_exhaustive]
pub struct XzeprClientConfig {
    /// Server base URL, e.g. `http://localhost:8042` (the contract's default).
    pub base_url: String,
    /// Bearer token (never printed). Empty: no `Authorization` header is sent
    /// (a server without authentication in front); a 401/403 then comes back as
    /// [`ClientError::Unauthorized`], which names `XZEPR_API_TOKEN`.
    pub token: String,
    /// Time from sending a request to its whole response. Default
    /// [`DEFAULT_REQUEST_TIMEOUT`] (30 s, see there why). When it fires after the
    /// request went out, the error is [`ClientError::ResponseLost`].
    pub request_timeout: Duration,
    /// Time to establish a connection (TCP and TLS). Default
    /// [`DEFAULT_CONNECT_TIMEOUT`] (5 s); it fails as [`ClientError::Connect`].
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per host. Default 128: the reporter's
    /// default in-flight limit, so every post in flight can find a warm connection.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Extra CA certificate (PEM) trusted besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for XzeprClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.token.trim().is_empty() {
            "<none>"
        } else {
            "<redacted>"
        };
        f.debug_struct("XzeprClientConfig")
            .field("base_url", &self.base_url)
            .field("token", &token)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl XzeprClientConfig {
    /// The transport's share of these settings.
    pub(super) fn transport(&self) -> TransportConfig {
        TransportConfig {
            connect_timeout: self.connect_timeout,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            pool_idle_timeout: self.pool_idle_timeout,
            ca_file: self.ca_file.clone(),
        }
    }

    /// Settings for `base_url` with `token` (empty: no `Authorization` header),
    /// other values at their defaults.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        XzeprClientConfig {
            base_url: base_url.into(),
            token: token.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_max_idle_per_host: 128,
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
        }
    }

    /// Sets [`XzeprClientConfig::request_timeout`].
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::connect_timeout`].
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::pool_max_idle_per_host`].
    #[must_use]
    pub fn with_pool_max_idle_per_host(mut self, idle: usize) -> Self {
        self.pool_max_idle_per_host = idle;
        self
    }

    /// Sets [`XzeprClientConfig::pool_idle_timeout`].
    #[must_use]
    pub fn with_pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::ca_file`].
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// From `XZEPR_API_URL` (default `http://localhost:8042`) and
    /// `XZEPR_API_TOKEN` (absent or empty: no `Authorization` header is sent).
    ///
    /// # Errors
    /// None today; kept fallible for settings still to come.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// As [`XzeprClientConfig::from_env`], reading through `lookup`.
    ///
    /// # Errors
    /// As [`XzeprClientConfig::from_env`].
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ClientError> {
        let url = lookup("XZEPR_API_URL")
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "http://localhost:8042".to_owned());
        let token = lookup("XZEPR_API_TOKEN")
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        Ok(Self::new(url, token))
    }
}

//! The HTTP transport: one pooled hyper client over rustls (HTTP/1.1 and
//! HTTP/2, keep-alive, web PKI roots plus an optional CA file), shared by the
//! XZepr client and anything else of the crate's users that posts over HTTP.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Release};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{ClientError, DEFAULT_CONNECT_TIMEOUT};

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Settings of an [`HttpTransport`]; [`XzeprClientConfig`](super::XzeprClientConfig)
/// carries the same ones for the XZepr client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Time to establish a connection (TCP and TLS). Default
    /// [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT).
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per host. Default 128.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Extra CA certificate (PEM) trusted besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_max_idle_per_host: 128,
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
        }
    }
}

impl TransportConfig {
    /// Sets [`TransportConfig::pool_max_idle_per_host`].
    #[must_use]
    pub fn with_pool_max_idle_per_host(mut self, idle: usize) -> Self {
        self.pool_max_idle_per_host = idle;
        self
    }

    /// Sets [`TransportConfig::connect_timeout`].
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// A pooled HTTP(S) client. Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct HttpTransport {
    http: Client<Https, SentBody>,
}

impl HttpTransport {
    /// Builds the transport.
    ///
    /// # Errors
    /// [`ClientError::Config`] for an unreadable or invalid CA file.
    pub fn new(config: &TransportConfig) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let bad = |reason: String| ClientError::Config {
                name: "ca_file",
                reason: reason.into(),
            };
            let pem = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config {
            name: "tls",
            reason: e.to_string().into(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(config.pool_idle_timeout)
            .build(https);
        Ok(HttpTransport { http })
    }

    /// Sends `req` (its body handed over as one frame) and returns the
    /// response once its head arrived. No timeout of its own: the caller
    /// bounds the whole exchange.
    ///
    /// # Errors
    /// [`ClientError::Connect`] with hyper's error as its source, whether the
    /// connection failed before or after the request went out.
    pub async fn send(
        &self,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let (req, _sent) = SentBody::wrap(req);
        self.http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect(Box::new(e)))
    }

    /// As [`HttpTransport::send`], with the flag that turns true once the body
    /// was handed in full to the connection, and hyper's own error.
    pub(super) fn send_tracked(
        &self,
        req: http::Request<Bytes>,
    ) -> (hyper_util::client::legacy::ResponseFuture, Arc<AtomicBool>) {
        let (req, sent) = SentBody::wrap(req);
        (self.http.request(req), sent)
    }
}

/// A request body that records when it was handed in full to the connection:
/// after that, a lost answer may mean the server acted on the request
/// ([`ClientError::ResponseLost`]); before it, the server cannot have.
#[derive(Debug)]
pub(super) struct SentBody {
    data: Option<Bytes>,
    sent: Arc<AtomicBool>,
}

impl SentBody {
    fn wrap(req: http::Request<Bytes>) -> (http::Request<SentBody>, Arc<AtomicBool>) {
        let sent = Arc::new(AtomicBool::new(false));
        let req = req.map(|data| SentBody {
            data: Some(data).filter(|d| !d.is_empty()),
            sent: Arc::clone(&sent),
        });
        (req, sent)
    }
}

impl hyper::body::Body for SentBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = self.data.take().map(|d| Ok(hyper::body::Frame::data(d)));
        // One frame is the whole body: taking it (or the end) is handing it all over.
        self.sent.store(true, Release);
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

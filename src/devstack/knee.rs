//! [`KneeServer`]: a service with a capacity, for flow-control tests and the
//! bench. Its latency stays at `base` up to `knee` concurrent requests and then
//! rises linearly with them (`base × concurrent / knee`: past the knee it
//! queues, so its throughput stays at `knee / base`); past `2 × knee` it
//! answers 503 at once. Each of those, and a status forced on every request,
//! can change while it runs.
//!
//! It answers any POST with XZepr's event-created body (`{"data": "<id>"}`),
//! so it stands in for XZepr's events endpoint (the reporter) as well as for
//! a `run --forward` endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// What the server saw; read at any time.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct KneeStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Answered 2xx.
    pub ok: AtomicU64,
    /// Answered 503 for being past `2 × knee`.
    pub over_threshold: AtomicU64,
    /// Answered with the forced status.
    pub forced: AtomicU64,
    /// Most requests in progress at once.
    pub peak_concurrent: AtomicUsize,
    /// How long the 2xx answers took, from arrival to answer.
    pub latency: Latencies,
}

/// Buckets per factor of e: consecutive bucket bounds are 1 % apart.
const BUCKETS_PER_E: f64 = 100.5;
/// Buckets from 1 µs up: the last holds everything from ~7 minutes on.
const BUCKETS: usize = 2_000;

/// A histogram of latencies to 1 %, filled by the server's tasks without a
/// lock. Read it through [`Latencies::snapshot`]; the difference of two
/// snapshots is what came in between.
#[derive(Debug)]
pub struct Latencies {
    buckets: Box<[AtomicU64]>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Latencies {
    /// Counts one answer that took `d`.
    pub fn record(&self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = if us <= 1.0 {
            0
        } else {
            ((us.ln() * BUCKETS_PER_E) as usize).min(BUCKETS - 1)
        };
        self.buckets[i].fetch_add(1, Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// The counts of [`Latencies`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    counts: Vec<u64>,
}

impl LatencySnapshot {
    /// What was counted after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// Answers counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The latency under which a share `q` (0 to 1) of the answers came, to
    /// 1 % (a bucket's upper bound); `None` with no answers.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let i = self.counts.iter().position(|c| {
            seen += c;
            seen >= rank
        })?;
        Some(Duration::from_secs_f64(
            ((i + 1) as f64 / BUCKETS_PER_E).exp() / 1e6,
        ))
    }
}

#[derive(Debug)]
struct Shared {
    knee: AtomicUsize,
    base_us: AtomicU64,
    /// 0: none; else every request gets it.
    force_status: AtomicU16,
    /// `Retry-After` seconds sent with 429/503 answers (0: none).
    retry_after_s: AtomicU64,
    concurrent: AtomicUsize,
    stats: KneeStats,
}

/// A running knee server; stops when dropped.
#[derive(Debug)]
pub struct KneeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KneeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KneeServer {
    /// Serves on 127.0.0.1 (a free port), flat at `base` up to `knee`
    /// concurrent requests (at least 1).
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(knee: usize, base: Duration) -> std::io::Result<KneeServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            knee: AtomicUsize::new(knee.max(1)),
            base_us: AtomicU64::new(super::micros(base)),
            force_status: AtomicU16::new(0),
            retry_after_s: AtomicU64::new(0),
            concurrent: AtomicUsize::new(0),
            stats: KneeStats::default(),
        });
        let task = super::serve(listener, Arc::clone(&shared), |s, req| async move {
            answer(&s, req).await
        });
        Ok(KneeServer { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it saw.
    pub fn stats(&self) -> &KneeStats {
        &self.shared.stats
    }

    /// Requests in progress now.
    pub fn concurrent(&self) -> usize {
        self.shared.concurrent.load(Relaxed)
    }

    /// The latency at `concurrent` requests in progress (itself included).
    pub fn latency_at(&self, concurrent: usize) -> Duration {
        latency(&self.shared, concurrent)
    }

    /// Moves the knee.
    pub fn set_knee(&self, knee: usize) {
        self.shared.knee.store(knee.max(1), Relaxed);
    }

    /// Changes the unloaded latency (a slower service, not a loaded one).
    pub fn set_base(&self, base: Duration) {
        self.shared.base_us.store(super::micros(base), Relaxed);
    }

    /// Answers every request with `status` (e.g. 503) at once, or, with
    /// `None`, by the knee again.
    pub fn force_status(&self, status: Option<u16>) {
        self.shared.force_status.store(status.unwrap_or(0), Relaxed);
    }

    /// Sends `Retry-After: SECONDS` with its 429 and 503 answers (`None`: not).
    pub fn retry_after(&self, after: Option<Duration>) {
        self.shared
            .retry_after_s
            .store(after.map_or(0, |d| d.as_secs().max(1)), Relaxed);
    }
}

fn latency(s: &Shared, concurrent: usize) -> Duration {
    let knee = s.knee.load(Relaxed).max(1);
    let base = Duration::from_micros(s.base_us.load(Relaxed));
    base.mul_f64((concurrent as f64 / knee as f64).max(1.0))
}

/// Counts a request in progress for as long as it lives.
struct InProgress<'a>(&'a AtomicUsize);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn answer(s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let arrived = Instant::now();
    let n = s.stats.requests.fetch_add(1, Relaxed);
    let now = s.concurrent.fetch_add(1, Relaxed) + 1;
    let _counted = InProgress(&s.concurrent);
    s.stats.peak_concurrent.fetch_max(now, Relaxed);
    // Read the body whole, as a real service does before answering.
    let _ = req.into_body().collect().await;
    let forced = s.force_status.load(Relaxed);
    if forced != 0 {
        s.stats.forced.fetch_add(1, Relaxed);
        return refusal(
            s,
            StatusCode::from_u16(forced).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        );
    }
    if now > 2 * s.knee.load(Relaxed).max(1) {
        s.stats.over_threshold.fetch_add(1, Relaxed);
        return refusal(s, StatusCode::SERVICE_UNAVAILABLE);
    }
    tokio::time::sleep(latency(s, now)).await;
    s.stats.ok.fetch_add(1, Relaxed);
    s.stats.latency.record(arrived.elapsed());
    let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"data\":\"K{n}\"}}"))));
    *resp.status_mut() = StatusCode::CREATED;
    resp
}

fn refusal(s: &Shared, status: StatusCode) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    let after = s.retry_after_s.load(Relaxed);
    if after > 0 && matches!(status.as_u16(), 429 | 503) {
        b = b.header("retry-after", after);
    }
    b.body(Full::new(Bytes::from_static(b"{\"error\":\"overloaded\"}")))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn latency_is_flat_to_the_knee_then_linear() {
        let k = KneeServer::start(10, Duration::from_millis(4))
            .await
            .unwrap();
        assert_eq!(k.latency_at(1), Duration::from_millis(4));
        assert_eq!(k.latency_at(10), Duration::from_millis(4));
        assert_eq!(k.latency_at(15), Duration::from_millis(6));
        k.set_base(Duration::from_millis(8));
        assert_eq!(k.latency_at(20), Duration::from_millis(16));
    }

    #[test]
    fn latency_quantiles_come_within_one_percent() {
        let l = Latencies::default();
        let before = l.snapshot();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let got = l.snapshot().since(&before);
        assert_eq!(got.count(), 100);
        for (q, ms) in [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0)] {
            let d = got.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!(d >= ms && d <= ms * 1.011, "q {q}: {d} ms");
        }
        let later = l.snapshot();
        l.record(Duration::from_secs(2));
        assert_eq!(l.snapshot().since(&later).count(), 1);
        assert_eq!(LatencySnapshot { counts: vec![] }.quantile(0.5), None);
    }
}

//! `bench --broker tansu` (or `--broker HOST:PORT`): the no-op, I/O and
//! reporting cases against a broker in its own process over TCP, beside the
//! mock's figures, and the consumer's memory under a backlog there.
//!
//! The in-process mock shares the process and the two cores with the consumer
//! and keeps its messages in the process's memory; a broker apart is what users
//! run. `tansu` starts [Tansu](https://crates.io/crates/tansu) (found as the
//! tests find it: `TANSU_BIN`, `~/.cargo/bin/tansu` or `PATH`) on 127.0.0.1
//! with SQLite storage in a fresh directory, and kills it afterwards; an
//! address uses a broker already running, with topics named for this run.
//!
//! Every topic is produced by a child `xzepr-consumer produce`, so the bench
//! process holds only the consumer when its resident set is read. The passes
//! are `pipeline.rs`'s, given this broker's address.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use xzepr_consumer::source::SourceOptions;

use super::pipeline::{io_pass, pipeline_noop, pipeline_report, raw_pass, rss_mb, PeakRss, Waits};
use super::{debug, median, windowed, Settings};
use crate::baseline::anyhow_like::Result;

/// How long Tansu may take to listen after it is started.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Which broker `--broker` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Tansu the bench starts and stops.
    Tansu,
    /// A broker already running at this `HOST:PORT`.
    Address(String),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "tansu" => Ok(Target::Tansu),
            a if a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Target::Address(a.to_owned()))
            }
            _ => Err(format!("expected `tansu` or HOST:PORT, got {s:?}")),
        }
    }
}

/// `--broker` and what it runs there.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub target: Target,
    /// Messages waiting in the broker for the memory case.
    pub backlog: u64,
}

/// The figures against the broker apart, named beside the mock's.
#[derive(Debug, serde::Serialize)]
pub struct BrokerFigures {
    /// `tansu` or the address given.
    pub tansu_broker: String,
    /// Events per second of the child producer filling the backlog.
    pub tansu_produce_eps: f64,
    pub tansu_raw_poll_eps: f64,
    pub tansu_pipeline_noop_eps: f64,
    pub tansu_noop_over_raw: f64,
    pub tansu_raw_poll_rounds: Vec<f64>,
    pub tansu_pipeline_noop_rounds: Vec<f64>,
    pub tansu_io_eps_256_5ms: f64,
    pub tansu_io_mean_wait_ms_5: f64,
    /// `eps / (256 / L)` with `L` the handlers' measured mean wait.
    pub tansu_littles_law_efficiency_measured_l: f64,
    pub tansu_pipeline_report_eps: f64,
    pub tansu_backlog: u64,
    /// The bench process's resident set before the backlog case.
    pub tansu_rss_before_mb: f64,
    /// Its peak while the I/O case (1,024 in flight x 20 ms, default budgets)
    /// consumes the backlog.
    pub consumer_rss_mb_backlog: f64,
    /// Of that: librdkafka's consumer queue at its peak (its own count).
    pub tansu_peak_prefetched_mb: f64,
    /// The pipeline's buffers at their peak (`peak_buffered_bytes`).
    pub tansu_peak_buffered_mb: f64,
    /// The rest over `tansu_rss_before_mb`: handler tasks, lanes, fetch
    /// responses in flight, the allocator's slack.
    pub tansu_rest_mb: f64,
    /// The budgets the figure was taken with: librdkafka's, as the
    /// library's default consumer configuration leaves them, and the
    /// pipeline's.
    pub tansu_queued_max_messages_kbytes: u64,
    pub tansu_fetch_max_bytes: u64,
    pub tansu_buffer_budget: u64,
}

impl std::fmt::Display for BrokerFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "against {} (a broker in its own process):",
            self.tansu_broker
        )?;
        writeln!(
            f,
            "tansu_pipeline_noop_eps: {:>8.0}  ({:.2} of raw {:.0})",
            self.tansu_pipeline_noop_eps, self.tansu_noop_over_raw, self.tansu_raw_poll_eps
        )?;
        writeln!(
            f,
            "tansu_io_eps_256_5ms:  {:>10.0}  ({:.3} of Little's law, measured wait {:.2} ms)",
            self.tansu_io_eps_256_5ms,
            self.tansu_littles_law_efficiency_measured_l,
            self.tansu_io_mean_wait_ms_5
        )?;
        writeln!(
            f,
            "tansu_pipeline_report_eps: {:>6.0}",
            self.tansu_pipeline_report_eps
        )?;
        write!(
            f,
            "consumer_rss_mb_backlog: {:.0} MB over a {}-message backlog ({:.0} before; \
             librdkafka's queue {:.0}, buffers {:.0}, rest {:.0}); produced at {:.0}/s",
            self.consumer_rss_mb_backlog,
            self.tansu_backlog,
            self.tansu_rss_before_mb,
            self.tansu_peak_prefetched_mb,
            self.tansu_peak_buffered_mb,
            self.tansu_rest_mb,
            self.tansu_produce_eps
        )
    }
}

/// Runs the cases against `b`'s broker, with `s`'s sizes; `group` names a
/// fresh consumer group.
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    b: &BrokerSettings,
    s: &Settings,
    group: &dyn Fn(&str) -> String,
) -> Result<BrokerFigures> {
    let tansu = match &b.target {
        Target::Tansu => Some(Tansu::start()?),
        Target::Address(_) => None,
    };
    let brokers = tansu
        .as_ref()
        .map_or_else(|| b.target_name(), Tansu::address);
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let topic = |what: &str| format!("xzepr-bench-{what}-{run_id}");
    let (backlog_topic, noop_topic, io_topic, report_topic) = (
        topic("backlog"),
        topic("noop"),
        topic("io"),
        topic("report"),
    );

    // Memory first, while the process holds nothing else.
    create_topic(rt, &brokers, &backlog_topic, s.partitions)?;
    let produce_secs = produce_apart(&brokers, &backlog_topic, b.backlog)?;
    let memory = backlog_memory(rt, &brokers, &backlog_topic, b.backlog, &group("backlog"))?;

    // The bare poll loop against the no-op pipeline, rounds interleaved; no
    // retention to dodge here, so one topic serves every round.
    create_topic(rt, &brokers, &noop_topic, s.partitions)?;
    produce_apart(&brokers, &noop_topic, s.events)?;
    let (mut raw, mut noop) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        for path in [round % 2, (round + 1) % 2] {
            let rate = if path == 0 {
                windowed(|_| raw_pass(&brokers, &noop_topic, &group("raw"), s.events))?
            } else {
                windowed(|_| pipeline_noop(&brokers, &noop_topic, &group("noop"), s.events, false))?
            };
            if debug() {
                eprintln!("{} round {round} path {path}: {rate:.0}/s", b.target_name());
            }
            [&mut raw, &mut noop][path].push(rate);
        }
    }
    let (raw_eps, noop_eps) = (median(raw.clone()), median(noop.clone()));

    // I/O-bound handlers, 256 in flight of 5 ms, against Little's law.
    let io_partitions = i32::try_from(s.io_events.div_ceil(4_000))
        .unwrap_or(1)
        .max(1);
    create_topic(rt, &brokers, &io_topic, io_partitions)?;
    produce_apart(&brokers, &io_topic, s.io_events)?;
    let waits = Arc::new(Waits::default());
    let mut io = Vec::new();
    for _ in 0..3 {
        io.push(windowed(|_| {
            let (e, secs, _) = io_pass(
                rt,
                &brokers,
                &io_topic,
                &group("io"),
                s.io_events,
                (256, Duration::from_millis(5), false),
                &waits,
            )?;
            Ok((e, secs))
        })?);
    }
    let io_eps = median(io);
    let wait_ms = waits.mean_ms();

    // Lifecycle reporting to the stand-in answering after `latency_ms`.
    let (addr, _standin) =
        rt.block_on(crate::standin::start(Duration::from_millis(s.latency_ms)))?;
    create_topic(rt, &brokers, &report_topic, s.partitions)?;
    produce_apart(&brokers, &report_topic, s.report_events)?;
    let report = pipeline_report(
        rt,
        &brokers,
        &report_topic,
        &group("report"),
        s.report_events,
        &format!("http://{addr}"),
    )?;
    drop(tansu);

    let mb = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let (prefetched, buffered) = (mb(memory.prefetched), mb(memory.buffered));
    Ok(BrokerFigures {
        tansu_broker: b.target_name(),
        tansu_produce_eps: b.backlog as f64 / produce_secs,
        tansu_raw_poll_eps: raw_eps,
        tansu_pipeline_noop_eps: noop_eps,
        tansu_noop_over_raw: noop_eps / raw_eps,
        tansu_raw_poll_rounds: raw,
        tansu_pipeline_noop_rounds: noop,
        tansu_io_eps_256_5ms: io_eps,
        tansu_io_mean_wait_ms_5: wait_ms,
        tansu_littles_law_efficiency_measured_l: io_eps / (256.0 / (wait_ms / 1e3)),
        tansu_pipeline_report_eps: report,
        tansu_backlog: b.backlog,
        tansu_rss_before_mb: memory.before_mb,
        consumer_rss_mb_backlog: memory.peak_mb,
        tansu_peak_prefetched_mb: prefetched,
        tansu_peak_buffered_mb: buffered,
        tansu_rest_mb: memory.peak_mb - memory.before_mb - prefetched - buffered,
        tansu_queued_max_messages_kbytes: librdkafka_default("queued.max.messages.kbytes")?,
        tansu_fetch_max_bytes: librdkafka_default("fetch.max.bytes")?,
        tansu_buffer_budget: SourceOptions::default().buffer_budget as u64,
    })
}

impl BrokerSettings {
    fn target_name(&self) -> String {
        match &self.target {
            Target::Tansu => "tansu".to_owned(),
            Target::Address(a) => a.clone(),
        }
    }
}

/// What the backlog case measured.
struct Memory {
    before_mb: f64,
    peak_mb: f64,
    prefetched: u64,
    buffered: u64,
}

/// The I/O case (1,024 in flight x 20 ms, default budgets) over a fifth of
/// the backlog, the process's resident set sampled every 10 ms meanwhile.
fn backlog_memory(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    backlog: u64,
    group: &str,
) -> Result<Memory> {
    let before_mb = rss_mb();
    let sampler = PeakRss::start();
    let waits = Arc::new(Waits::default());
    let passed = io_pass(
        rt,
        brokers,
        topic,
        group,
        (backlog / 5).max(1),
        (1024, Duration::from_millis(20), false),
        &waits,
    );
    let peak_mb = sampler.stop();
    let (_, _, peaks) = passed?;
    Ok(Memory {
        before_mb,
        peak_mb,
        prefetched: peaks.prefetched,
        buffered: peaks.buffered,
    })
}

/// librdkafka's value for `key` in the consumer configuration the library
/// builds by default (its own default where the library sets none).
fn librdkafka_default(key: &str) -> Result<u64> {
    let c = xzepr_consumer::config::KafkaConsumerConfig::new("127.0.0.1:9092", "t", "bench");
    let value = c.to_client_config()?.create_native_config()?.get(key)?;
    Ok(value.parse()?)
}

fn create_topic(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    name: &str,
    partitions: i32,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let timeout = Some(Duration::from_secs(30));
    let options = AdminOptions::new()
        .operation_timeout(timeout)
        .request_timeout(timeout);
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for r in rt.block_on(admin.create_topics([&topic], &options))? {
        r.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Produces `events` to `topic` from a child `xzepr-consumer produce`, so the
/// producer's queues are not in this process; the seconds it took.
fn produce_apart(brokers: &str, topic: &str, events: u64) -> Result<f64> {
    let start = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args([
            "produce",
            "--brokers",
            brokers,
            "--topic",
            topic,
            "--seed",
            "0",
        ])
        .args(["--events", &events.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("producing {events} events to {topic}: {status}").into());
    }
    let secs = start.elapsed().as_secs_f64();
    if debug() {
        eprintln!("produced {events} to {topic} in {secs:.1} s");
    }
    Ok(secs)
}

/// A Tansu broker on a free 127.0.0.1 port, its SQLite file in a fresh
/// directory; killed, and the directory removed, on drop.
struct Tansu {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Tansu {
    fn start() -> Result<Tansu> {
        let bin = tansu_binary().ok_or(
            "bench --broker tansu: no tansu binary (set TANSU_BIN, or \
             `cargo install tansu@0.6.0 --locked --features libsql`)",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("xzepr-bench-tansu-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .current_dir(&dir)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative: the broker mangles an absolute SQLite path.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let tansu = Tansu { child, dir, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > START_PATIENCE {
                return Err(format!("tansu did not listen on {url} in {START_PATIENCE:?}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(tansu)
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on `PATH`.
fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/tansu"));
    home.filter(|p| p.exists()).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("tansu"))
            .find(|p| p.exists())
    })
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn broker_flag_takes_tansu_or_an_address() {
        assert_eq!("tansu".parse(), Ok(Target::Tansu));
        assert_eq!(
            "kafka.internal:9092".parse(),
            Ok(Target::Address("kafka.internal:9092".into()))
        );
        for bad in ["", "tansu:", ":9092", "host", "host:port"] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }
}

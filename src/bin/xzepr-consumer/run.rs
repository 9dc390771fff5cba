//! `run`: consume a real topic with the library's pipeline and hand each wanted
//! event to a program (`--exec`, see [`crate::exec`]) or an HTTP endpoint
//! (`--forward`, see [`crate::forward`]), reporting `{work}.started` /
//! `.completed` / `.failed` to XZepr and committing an offset only once its
//! work and every earlier offset's are finished and reported.
//!
//! Configuration is the library's: `KafkaConsumerConfig::from_env` and
//! `XzeprClientConfig::from_env` (the `XZEPR_*` variables), with flags on top.
//! Secrets come from the environment or a file only, never from a flag, and
//! nothing here prints them: the configs' `Debug` is redacted, URLs are logged
//! without credentials.
//!
//! The handlers live in the binary, not the library: they are a command's
//! policy (process environment, HTTP mapping, exit codes) with no API to keep
//! stable, and the library stays free of process and CLI concerns.
//!
//! On SIGINT or SIGTERM: stop fetching, let the work in flight finish (up to
//! `--drain-timeout`), commit, flush the lifecycle posts, exit 0. A second
//! signal exits at once (130); what had not finished is replayed by the next
//! run, never committed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::flow_control::Concurrency;
use xzepr_consumer::handler::{AsyncHandler, BoxFuture, HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{
    Pipeline, PipelineBuilder, PipelineConfig, Reporting, RetryPolicy, RunningPipeline,
    WorkTemplate,
};
use xzepr_consumer::report::Reporter;
use xzepr_consumer::source::{Assignment, StartFrom};

use crate::args::{parse_duration, redact_url, KafkaArgs};
use crate::baseline::anyhow_like::Result;
use crate::exec::Exec;
use crate::forward::Forward;

/// Default `--concurrency` for `--exec`: processes are heavy.
const EXEC_CONCURRENCY: usize = 16;
/// Default `--concurrency` for `--forward`: the XZepr client's pool size.
const FORWARD_CONCURRENCY: usize = 128;
/// Default `--retries` for `--exec`: a program's effects may not be idempotent.
const EXEC_RETRIES: u32 = 0;
/// Default `--retries` for `--forward`: only transient answers are retried.
const FORWARD_RETRIES: u32 = 2;
/// Longest attempt at one event's work, unless `--timeout` or the file says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `run`'s flags.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("action").required(true).args(["exec", "forward"])),
    after_help = crate::exec::HELP
)]
pub struct RunArgs {
    /// The service's name: the consumer group is `xzepr-consumer-NAME` (unless
    /// $XZEPR_KAFKA_GROUP_ID or --group-id), the lifecycle posts' package, and
    /// the receiver and work name unless given.
    #[arg(long, value_name = "NAME")]
    pub service_name: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group [default: $XZEPR_KAFKA_GROUP_ID, else
    /// xzepr-consumer-NAME].
    #[arg(long, value_name = "GROUP")]
    pub group_id: Option<String>,
    /// Static group membership under this name, one per running instance
    /// (e.g. the pod name): a restart inside the session timeout takes its
    /// partitions back without a rebalance [default:
    /// $XZEPR_KAFKA_GROUP_INSTANCE_ID, else dynamic membership].
    #[arg(long, value_name = "NAME")]
    pub group_instance_id: Option<String>,
    /// How a rebalance moves partitions: `eager` stops every partition of
    /// every member, `cooperative` (cooperative-sticky) only the ones that
    /// move. Every member of a group must use the same [default: eager].
    #[arg(long, value_enum)]
    pub assignment: Option<AssignmentArg>,
    /// XZepr's base URL [default: $XZEPR_API_URL, else http://localhost:8042].
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Read the XZepr token from this file instead of $XZEPR_API_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
    /// The receiver the lifecycle is posted under, found or created [default:
    /// the service name].
    #[arg(long, value_name = "NAME")]
    pub receiver_name: Option<String>,
    /// The receiver's type.
    #[arg(long, value_name = "TYPE", default_value = "worker")]
    pub receiver_type: String,
    /// The receiver's version (when it is created).
    #[arg(long, value_name = "VERSION", default_value = "1.0.0")]
    pub receiver_version: String,
    /// The receiver's description (when it is created).
    #[arg(long, value_name = "TEXT")]
    pub receiver_description: Option<String>,
    /// The work's name: posts are WORK.started, WORK.completed, WORK.failed
    /// [default: the service name].
    #[arg(long, value_name = "WORK")]
    pub work_name: Option<String>,
    /// The work's version (and release).
    #[arg(long, value_name = "VERSION", default_value = "1.0.0")]
    pub work_version: String,
    /// Post no lifecycle events (no XZepr needed); offsets are still committed
    /// only after the work finished.
    #[arg(long)]
    pub no_report: bool,
    /// Most events in flight at once: N, or `adaptive[:MIN-MAX]` (async
    /// work only: grows while latency stays near its lowest, cut on rising
    /// latency, timeouts and, with --forward, 429/503, honouring Retry-After)
    /// [default: 16 with --exec, 128 with --forward].
    #[arg(long, value_name = "N|adaptive[:MIN-MAX]")]
    pub concurrency: Option<Concurrency>,
    /// At most N events a second reach the work (a token bucket; events wait,
    /// none is dropped or failed) [default: no limit].
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// With --rate: events that may start at once after a quiet spell
    /// [default: a tenth of a second's worth].
    #[arg(long, value_name = "B", requires = "rate")]
    pub rate_burst: Option<u32>,
    /// What stays in order: one event at a time per partition, per message
    /// key (XZepr keys by event id), or none [default: partition].
    #[arg(long, value_enum)]
    pub ordering: Option<OrderingArg>,
    /// Handle only these event types: a prefix (`deployment.`) or a glob
    /// (`*.failed`); repeat for more. Other events are committed unhandled.
    #[arg(long = "type", value_name = "PREFIX_OR_GLOB")]
    pub types: Vec<String>,
    /// Longest run of one attempt at an event's work; past it the program is
    /// killed (or the request dropped) and the attempt fails with code
    /// `timeout` [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// On SIGINT/SIGTERM, how long work in flight may take to finish before it
    /// is cancelled (and replayed by the next run) [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// With --forward: send structured CloudEvents
    /// (application/cloudevents+json) instead of binary mode (ce-* headers).
    #[arg(long, requires = "forward")]
    pub structured: bool,
    /// With --forward: POST each lane's run of events (up to --batch) in one
    /// JSON request, {"events": [...]}, answered {"results": [...]} with one
    /// {"status": "done"|"retry"|"failed"} per event, in order.
    #[arg(long, requires = "forward")]
    pub forward_batch: bool,
    /// Most events of one lane handed over at once: one job, and with
    /// --forward-batch one request [default: 64].
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Retries of a failed event, by the pipeline's retry policy (backoff from
    /// 200 ms doubling up to 30 s, with jitter; only the event's lane waits).
    /// With --forward only transport errors, 408, 429 and 5xx are retried
    /// [default: 0 with --exec, 2 with --forward].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Long delays for an event whose retries are spent: it is produced to
    /// `<topic>.retry.<delay>` for each delay in turn (e.g. 1m,10m,1h), its
    /// offset finished once the broker took it, and runs again once due
    /// (its partition paused until then); after the last one it fails for
    /// good. The topics must exist. It leaves its key's order.
    #[arg(long, value_name = "DELAYS", value_delimiter = ',', value_parser = parse_duration)]
    pub delay_topics: Option<Vec<Duration>>,
    /// Where a partition the group has no committed offset for starts:
    /// committed (the consumer's auto_offset_reset: earliest), earliest,
    /// latest, or a time
    /// (RFC 3339, or ms since the epoch) for the first event at or after it.
    /// A committed offset always wins: to move one, stop the group and use
    /// `offsets reset`.
    #[arg(long, value_name = "WHERE", value_parser = StartFrom::parse)]
    pub start_from: Option<StartFrom>,
    /// Serve Prometheus metrics on GET /metrics, and GET /health and GET /ready,
    /// at this address (e.g. 0.0.0.0:9464; port 0 picks a free one, logged).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Produce events that failed on their last attempt, and malformed
    /// messages, to a dead-letter topic (`<topic>.dlq`, or --dead-letter-topic)
    /// with their key, payload and headers unchanged plus headers saying why;
    /// an offset finishes only once the broker acknowledged its dead letter.
    #[arg(long)]
    pub dead_letter: bool,
    /// The dead-letter topic (implies --dead-letter).
    #[arg(long, value_name = "TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Every pipeline setting (the library's `PipelineConfig`) from a JSON
    /// file: budgets, commit and stall timings, retry backoff, dead-letter
    /// producer properties, decoder limits... The flags above override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings `run` would use (the file, then the flags and the
    /// command's defaults) as JSON, and exit without connecting.
    #[arg(long)]
    pub print_config: bool,
    /// POST each event to this URL as a CloudEvent; 2xx is completed.
    #[arg(long, value_name = "URL")]
    pub forward: Option<String>,
    /// Run this program for each event (event JSON on stdin, attributes in
    /// XZEPR_EVENT_*/KAFKA_* variables); exit 0 is completed. Takes the rest
    /// of the command line: put it last.
    #[arg(
        long,
        value_name = "CMD [ARGS]...",
        num_args = 1..,
        allow_hyphen_values = true,
        trailing_var_arg = true
    )]
    pub exec: Option<Vec<String>>,
}

/// `--ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderingArg {
    /// One event at a time per partition, in offset order.
    Partition,
    /// One event at a time per message key, in offset order within the key.
    Key,
    /// No order: any event runs when there is room.
    None,
}

impl From<OrderingArg> for Ordering {
    fn from(o: OrderingArg) -> Ordering {
        match o {
            OrderingArg::Partition => Ordering::PerPartition,
            OrderingArg::Key => Ordering::PerKey,
            OrderingArg::None => Ordering::Unordered,
        }
    }
}

/// `--assignment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AssignmentArg {
    /// Every rebalance revokes and drains every partition.
    Eager,
    /// Incremental cooperative-sticky: only the partitions that move drain.
    Cooperative,
}

impl From<AssignmentArg> for Assignment {
    fn from(a: AssignmentArg) -> Assignment {
        match a {
            AssignmentArg::Eager => Assignment::Eager,
            AssignmentArg::Cooperative => Assignment::Cooperative,
        }
    }
}

/// What each event is handed to.
#[derive(Debug, Clone)]
pub enum Action {
    /// A program per event.
    Exec(Exec),
    /// An HTTP POST per event.
    Forward(Forward),
}

impl AsyncHandler for Action {
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<std::result::Result<Value, HandlerError>> {
        match self {
            Action::Exec(e) => e.handle(message, info),
            Action::Forward(f) => f.handle(message, info),
        }
    }
}

/// The pipeline's settings: the `--config` file, then the flags over it,
/// then the command's defaults (`concurrency`, `retries`, `timeout`, and
/// malformed messages to the dead-letter topic when there is one) for what
/// neither set.
pub fn settings(args: &RunArgs, concurrency: usize, retries: u32) -> Result<PipelineConfig> {
    use serde_json::json;
    let mut v = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--config {}: {e}", path.display()))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(format!("--config {}: not a JSON object", path.display()).into())
                }
                Err(e) => return Err(format!("--config {}: {e}", path.display()).into()),
            }
        }
        None => serde_json::Map::new(),
    };
    let duration = |d: Duration| json!(xzepr_consumer::config::duration::format(d));
    // A flag given wins over the file; a default fills only what neither set.
    fn put(
        v: &mut serde_json::Map<String, Value>,
        key: &str,
        given: Option<Value>,
        default: Option<Value>,
    ) {
        match (given, default) {
            (Some(value), _) => {
                v.insert(key.to_owned(), value);
            }
            (None, Some(value)) => {
                v.entry(key).or_insert(value);
            }
            (None, None) => {}
        }
    }
    let mut set = |key: &str, given, default| put(&mut v, key, given, default);
    set(
        "max_in_flight",
        args.concurrency.map(|c| json!(c)),
        Some(json!(concurrency)),
    );
    set(
        "ordering",
        args.ordering.map(|o| json!(Ordering::from(o))),
        None,
    );
    set(
        "assignment",
        args.assignment.map(|a| json!(Assignment::from(a))),
        None,
    );
    set(
        "types",
        (!args.types.is_empty()).then(|| json!(args.types)),
        None,
    );
    set(
        "handler_timeout",
        args.timeout.map(duration),
        Some(duration(DEFAULT_TIMEOUT)),
    );
    set("drain_timeout", args.drain_timeout.map(duration), None);
    set("batch", args.batch.map(|n| json!(n)), None);
    let rate = args
        .rate
        .map(|r| json!({"per_second": r, "burst": args.rate_burst}));
    set("rate_limit", rate, None);
    set("metrics_addr", args.metrics_addr.map(|a| json!(a)), None);
    set("start_from", args.start_from.map(|s| json!(s)), None);
    let dead_letter = match (&args.dead_letter_topic, args.dead_letter) {
        (Some(topic), _) => Some(json!({"topic": topic})),
        (None, true) => Some(json!({})),
        (None, false) => None,
    };
    set("dead_letter", dead_letter, None);
    if v.get("dead_letter").is_some_and(|d| !d.is_null()) {
        put(&mut v, "malformed", None, Some(json!("dead_letter")));
    }
    let mut config = PipelineConfig::from_json(&Value::Object(v.clone()).to_string())
        .map_err(|e| format!("--config: {e}"))?;
    // `--retries` sets the attempts and keeps the file's backoff.
    let attempts = |n: u32| n.saturating_add(1);
    match (args.retries, v.get("retry")) {
        (Some(n), _) => config.retry = config.retry.clone().with_max_attempts(attempts(n)),
        (None, None) => config.retry = RetryPolicy::attempts(attempts(retries)),
        (None, Some(_)) => {}
    }
    if let Some(delays) = &args.delay_topics {
        config.retry = config.retry.clone().delay_topics(delays.iter().copied());
    }
    Ok(config)
}

/// The pipeline for `action` on `runtime`, configured from `settings`.
fn builder(
    kafka: KafkaConsumerConfig,
    settings: &PipelineConfig,
    runtime: tokio::runtime::Handle,
) -> PipelineBuilder {
    Pipeline::builder(kafka)
        .config(settings.clone())
        .runtime(runtime)
}

/// Starts the pipeline running `action` on `runtime`, reporting through
/// `lifecycle` when given. `bench` measures this same path.
pub fn start(
    kafka: KafkaConsumerConfig,
    action: Action,
    settings: &PipelineConfig,
    runtime: tokio::runtime::Handle,
    lifecycle: Option<(Reporter, WorkTemplate)>,
) -> std::result::Result<RunningPipeline, xzepr_consumer::Error> {
    let mut builder = builder(kafka, settings, runtime);
    if let Some((reporter, work)) = lifecycle {
        builder = builder.lifecycle(reporter, work);
    }
    builder.start_async(action)
}

/// Runs the command until a signal (then drains: exit 0) or until the consumer
/// stops on an error (returned).
pub fn run(args: RunArgs, traced: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xzepr-run")
        .build()?;
    rt.block_on(run_async(args, traced))
}

async fn run_async(args: RunArgs, traced: bool) -> Result<()> {
    let service = args.service_name.trim().to_owned();
    if service.is_empty() {
        return Err("--service-name must not be empty".into());
    }
    let mut kafka = args.kafka.config(&service)?;
    if let Some(group) = &args.group_id {
        kafka.group_id.clone_from(group);
    }
    if let Some(id) = &args.group_instance_id {
        kafka.group_instance_id = Some(id.clone());
    }
    // Checked before anything starts: errors name the variable, never a secret.
    kafka.to_client_config()?;
    let (action, default_concurrency, default_retries) = match (&args.exec, &args.forward) {
        (Some(cmd), _) => {
            let exec = Exec::new(cmd).ok_or("--exec needs a program")?;
            (Action::Exec(exec), EXEC_CONCURRENCY, EXEC_RETRIES)
        }
        (None, Some(url)) => {
            let concurrency = args.concurrency.map_or(FORWARD_CONCURRENCY, |c| c.max());
            let forward = Forward::new(url, args.structured, concurrency)?;
            (
                Action::Forward(forward),
                FORWARD_CONCURRENCY,
                FORWARD_RETRIES,
            )
        }
        (None, None) => return Err("one of --exec or --forward is required".into()),
    };
    let mut settings = settings(&args, default_concurrency, default_retries)?;
    // Spans are made when something exports them.
    settings.traces |= traced;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    let mut pipeline = builder(kafka.clone(), &settings, tokio::runtime::Handle::current());
    if matches!(action, Action::Forward(_)) {
        // The limit is the endpoint's: its gauge says so.
        pipeline = pipeline.limit_label("forward");
    }
    if !args.no_report {
        pipeline = pipeline.report_to(reporting(&args, &service)?);
    }
    let pipeline = pipeline.build()?;
    match &action {
        Action::Exec(e) => tracing::info!(program = %e.program(), "Handing events to a program."),
        Action::Forward(_) => tracing::info!(
            url = %redact_url(args.forward.as_deref().unwrap_or_default()),
            structured = args.structured,
            "Forwarding events."
        ),
    }
    tracing::info!(
        brokers = %kafka.brokers,
        topics = ?kafka.topics,
        group = %kafka.group_id,
        instance = kafka.group_instance_id.as_deref().unwrap_or("-"),
        assignment = ?settings.source.assignment,
        concurrency = %settings.source.max_in_flight,
        ordering = ?settings.source.ordering,
        types = ?settings.types,
        "Consuming."
    );
    let drain_timeout = settings.source.drain_timeout;
    let watch = move |running: Arc<RunningPipeline>| async move {
        if let Some(addr) = running.metrics_addr() {
            tracing::info!(%addr, "Serving /metrics, /health and /ready.");
        }
        let reason = crate::run_status::watch(&running).await;
        tracing::info!(
            reason,
            ?drain_timeout,
            "Stopping: draining the work in flight, then committing."
        );
        tokio::spawn(async {
            if signal().await.is_some() {
                tracing::warn!("Second signal: exiting without draining; unfinished work is replayed by the next run.");
                std::process::exit(130);
            }
        });
    };
    let summary = match action {
        Action::Forward(forward) if args.forward_batch => {
            pipeline.run_batch_watching(forward, watch).await?
        }
        action => pipeline.run_watching(action, watch).await?,
    };
    let m = summary.metrics;
    tracing::info!(
        handled = m.handled,
        failed = m.handler_failed,
        timeouts = m.handler_timeouts,
        filtered = m.filtered,
        own_skipped = m.own_skipped,
        malformed = m.malformed,
        report_failed = m.report_failed,
        "Stopped."
    );
    Ok(())
}

/// Where the lifecycle is reported: the client from the environment (and
/// the flags), the receiver and the work.
fn reporting(args: &RunArgs, service: &str) -> Result<Reporting> {
    let mut config = XzeprClientConfig::from_env()?;
    if let Some(url) = &args.api_url {
        config.base_url.clone_from(url);
    }
    if let Some(path) = &args.api_token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-token-file {}: {e}", path.display()))?;
        config.token = token.trim().to_owned();
    }
    tracing::info!(url = %redact_url(&config.base_url), "Reporting to XZepr.");
    let client = XzeprClient::new(config)?;
    let description = args
        .receiver_description
        .clone()
        .unwrap_or_else(|| format!("{service}: events handled by xzepr-consumer run"));
    Ok(Reporting::new(client, service)
        .receiver(
            args.receiver_name.as_deref().unwrap_or(service),
            &args.receiver_type,
        )
        .receiver_details(
            &args.receiver_version,
            description,
            serde_json::json!({"type": "object"}),
        )
        .work(
            args.work_name.as_deref().unwrap_or(service),
            &args.work_version,
        ))
}

/// SIGINT or SIGTERM; `None` when neither can be listened for.
pub(crate) async fn signal() -> Option<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok()?;
        let mut int = signal(SignalKind::interrupt()).ok()?;
        tokio::select! {
            _ = int.recv() => Some("SIGINT"),
            _ = term.recv() => Some("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok().map(|()| "Ctrl-C")
    }
}

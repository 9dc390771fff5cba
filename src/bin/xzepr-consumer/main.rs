//! `xzepr-consumer`: `run` (any program or HTTP service as an XZepr consumer),
//! `tail` (print a topic's events), the quickstart demo, the embedded dev stack,
//! a producer of realistic XZepr events, the end-to-end benchmark, and the
//! incident tools: `offsets show|reset` and `redrive`.

mod args;
mod baseline;
mod bench;
mod demo;
mod exec;
mod forward;
mod forward_batch;
mod offsets;
mod produce;
mod redrive;
mod run;
mod run_status;
mod tail;

/// The events endpoint `bench` reports to: the dev stack's XZepr stand-in (the
/// one stand-in the CLI uses), with the token and receiver `bench` posts with.
mod standin {
    use std::net::SocketAddr;
    use std::time::Duration;

    use xzepr_consumer::devstack::StandIn;

    /// `bench`'s token and receiver id (see `bench.rs` and `baseline.rs`).
    const TOKEN: &str = "bench-token";
    const RECEIVER: &str = "01BENCHRECEIVER00000000000";

    /// Starts the stand-in answering event posts after `latency`. It serves as
    /// long as the returned `StandIn` lives.
    pub(crate) async fn start(latency: Duration) -> std::io::Result<(SocketAddr, StandIn)> {
        let standin = StandIn::builder(TOKEN).latency(latency).start().await?;
        standin.insert_receiver(RECEIVER, "bench", "worker");
        Ok((standin.local_addr(), standin))
    }
}

use clap::{Parser, Subcommand};

// glibc's allocator serialises the poll thread, librdkafka's threads and the
// runtime's workers on its arena locks at forwarding rates (malloc and free
// were a fifth of `run --forward`'s profile); mimalloc keeps a heap per thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "xzepr-consumer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume a topic and hand each event to a program (--exec) or an HTTP
    /// endpoint (--forward), reporting WORK.started/.completed/.failed to XZepr
    /// and committing each offset once its work is done and reported. Kafka and
    /// XZepr settings come from the XZEPR_* variables; flags override them.
    Run(Box<run::RunArgs>),
    /// Print a topic's events (one JSON line each, or a table on a terminal)
    /// without joining a consumer group or committing anything.
    Tail(tail::TailArgs),
    /// Start the embedded stack (Kafka-protocol broker + XZepr stand-in), print
    /// their addresses and a token, and run until Ctrl-C.
    Dev {
        /// Partitions of `xzepr.dev.events`.
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Stand-in latency per event POST, in ms.
        #[arg(long, default_value_t = 5)]
        api_latency_ms: u64,
        /// The stand-in's race window on receiver create: this many ms between
        /// its "already exists?" check and its insert, so concurrent creates of
        /// one name and type can all succeed (as on the real server).
        #[arg(long, default_value_t = 0)]
        receiver_create_delay_ms: u64,
        /// The stand-in records each event post at once and answers this many ms
        /// later (XZepr with its Kafka down: 10,000–14,000).
        #[arg(long, default_value_t = 0)]
        response_delay_ms: u64,
    },
    /// Producer → in-process broker → pipeline with automatic lifecycle → XZepr
    /// stand-in, end to end; exits non-zero if anything was lost.
    Demo {
        /// Events to produce.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Partitions of the topic (the in-process broker keeps ~5 MB per
        /// partition, and XZepr republishes two lifecycle events per event).
        #[arg(long, default_value_t = 256)]
        partitions: i32,
        /// Stand-in latency per event POST, in ms (5: the real server's).
        #[arg(long, default_value_t = 5)]
        api_latency_ms: u64,
        /// Print one JSON object instead of the progress bar and summary.
        #[arg(long)]
        json: bool,
    },
    /// Measure, in one process: a bare poll loop against the pipeline with a
    /// no-op handler (same messages), I/O-bound async handlers against Little's
    /// law, memory under a backlog far over the budget, lifecycle reporting
    /// against the plan's sequential design, and `run --forward` to a local
    /// endpoint answering at once.
    Bench {
        /// Events per poll/no-op topic (the mock broker keeps ~5 MB per
        /// partition: at most ~4,000 of these ~1 KB events per partition).
        #[arg(long, default_value_t = 256_000)]
        events: u64,
        /// Partitions of each poll/no-op topic.
        #[arg(long, default_value_t = 64)]
        partitions: i32,
        /// Rounds of the poll/no-op comparison (medians reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Events of the I/O-bound topic (at least ~1 s at 51,200 events/s).
        #[arg(long, default_value_t = 64_000)]
        io_events: u64,
        /// Messages waiting in the broker for the memory case.
        #[arg(long, default_value_t = 1_000_000)]
        backlog: u64,
        /// Latency of the local XZepr events endpoint, in ms (5: what the real
        /// server takes per event POST).
        #[arg(long, default_value_t = 5)]
        api_latency_ms: u64,
        /// Events for the reporting pipeline path.
        #[arg(long, default_value_t = 16_000)]
        report_events: u64,
        /// Events for the plan's design (two sequential posts each: slow).
        #[arg(long, default_value_t = 300)]
        seed_events: u64,
        /// Events for `run --forward` to a local endpoint answering at once.
        #[arg(long, default_value_t = 32_000)]
        forward_events: u64,
        /// Events for `run --exec` against a bare loop spawning the same
        /// program (`/bin/true`, and `sh` reading its stdin).
        #[arg(long, default_value_t = 2_000)]
        exec_events: u64,
        /// Also run the no-op and I/O cases with a span per event and step
        /// (built with feature `otel`), exported over OTLP/HTTP to a local
        /// endpoint answering at once, interleaved with the untraced rounds.
        #[arg(long)]
        traces: bool,
        /// Also the flow-control cases: the reporter against a local service
        /// whose latency rises past a knee (fixed limits swept, then
        /// adaptive), and `run --rate 2000` over a 20 s backlog.
        #[arg(long)]
        flow_control: bool,
        /// Also the no-op, I/O and reporting cases, and the memory under a
        /// backlog, against a broker in its own process over TCP: `tansu`
        /// (started here, SQLite storage; TANSU_BIN, ~/.cargo/bin/tansu or
        /// PATH) or the HOST:PORT of one already running.
        #[arg(long, value_name = "tansu|HOST:PORT")]
        broker: Option<bench::Target>,
        /// Messages waiting in that broker for its memory case.
        #[arg(long, default_value_t = 1_000_000)]
        broker_backlog: u64,
        /// Also the pipeline with the PostgreSQL idempotency guard against
        /// the guide's SELECT + INSERT per event in the same pipeline (a build
        /// with feature postgres): `local` starts a throwaway server with
        /// durable defaults (initdb and pg_ctl from PG_BIN_DIR or
        /// /usr/lib/postgresql/*/bin); a URL uses a running one, in a database
        /// the bench creates there and drops.
        #[arg(long, value_name = "local|URL")]
        postgres: Option<bench::Postgres>,
        /// Events of that comparison.
        #[arg(long, default_value_t = 20_000)]
        guard_events: u64,
        /// Only the paths beside the bare thing each wraps (the reporter, `run
        /// --forward`, `run --exec`, large-event decoding, and the guard with
        /// --postgres; uses --partitions, --forward-events, --exec-events,
        /// --guard-events): a minute or two, to profile one.
        #[arg(long, conflicts_with_all = ["traces", "flow_control", "broker"])]
        wraps_only: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Produce realistic XZepr CloudEvents into any Kafka broker.
    Produce(produce::ProduceArgs),
    /// A consumer group's committed offsets, completion maps and lag
    /// (`show`), and moving them to a time, the start, the end or by N
    /// (`reset`) while the group is stopped.
    Offsets {
        #[command(subcommand)]
        command: offsets::OffsetsCommand,
    },
    /// Produce a dead-letter topic's letters again to the topics they came
    /// from (or --to), without the dead-letter headers, committing each only
    /// once the broker acknowledged it; prints what moved, by reason.
    Redrive(Box<redrive::RedriveArgs>),
}

fn main() -> std::process::ExitCode {
    match run_command(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Display, not Debug: errors name the setting at fault, never a secret.
            eprintln!("error: {}", xzepr_consumer::ErrorChain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli) -> baseline::anyhow_like::Result<()> {
    // `run` is a long-lived service: its start, status and stop are worth a line.
    let default_level = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        );
    // `run` exports its spans when built with `otel` and an OTEL_* endpoint
    // is set; the guard flushes them when `run` returns.
    #[cfg(feature = "otel")]
    let (_sink, traces) = match cli.command {
        Command::Run(_) => (None, xzepr_consumer::trace::init_from_env()?),
        Command::Bench { traces: true, .. } => {
            let (sink, guard) = bench::traces()?;
            (Some(sink), Some(guard))
        }
        _ => (None, None),
    };
    #[cfg(feature = "otel")]
    let (spans, traced) = (traces.as_ref().map(|t| t.layer()), traces.is_some());
    #[cfg(not(feature = "otel"))]
    let (spans, traced) = (None::<tracing_subscriber::layer::Identity>, false);
    tracing_subscriber::registry().with(logs).with(spans).init();
    match cli.command {
        Command::Run(args) => run::run(*args, traced)?,
        Command::Tail(args) => tail::tail(&args)?,
        Command::Dev {
            partitions,
            api_latency_ms,
            receiver_create_delay_ms,
            response_delay_ms,
        } => {
            // The stand-in reads its switches from these (`StandIn::start`); set
            // here, before any thread is started.
            use xzepr_consumer::devstack::{ENV_RECEIVER_CREATE_DELAY_MS, ENV_RESPONSE_DELAY_MS};
            std::env::set_var(
                ENV_RECEIVER_CREATE_DELAY_MS,
                receiver_create_delay_ms.to_string(),
            );
            std::env::set_var(ENV_RESPONSE_DELAY_MS, response_delay_ms.to_string());
            demo::dev(partitions, api_latency_ms)?
        }
        Command::Demo {
            events,
            partitions,
            api_latency_ms,
            json,
        } => {
            let s = demo::run(events, partitions, api_latency_ms, !json)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("{s}");
            }
            if s.lost > 0 || s.committed != s.end_offsets {
                return Err(format!(
                    "lost {} events; committed {} of {}",
                    s.lost, s.committed, s.end_offsets
                )
                .into());
            }
        }
        Command::Bench {
            events,
            partitions,
            rounds,
            io_events,
            backlog,
            api_latency_ms,
            report_events,
            seed_events,
            forward_events,
            exec_events,
            traces,
            flow_control,
            broker,
            broker_backlog,
            postgres,
            guard_events,
            wraps_only,
            json,
        } => {
            if traces && !cfg!(feature = "otel") {
                return Err("bench --traces needs a build with feature otel".into());
            }
            if postgres.is_some() && !cfg!(feature = "postgres") {
                return Err("bench --postgres needs a build with feature postgres".into());
            }
            let settings = bench::Settings {
                events,
                partitions,
                rounds: rounds.max(1),
                io_events,
                backlog,
                latency_ms: api_latency_ms,
                report_events,
                seed_events,
                forward_events,
                exec_events,
                traces,
                flow_control,
                broker: broker.map(|target| bench::BrokerSettings {
                    target,
                    backlog: broker_backlog,
                }),
                postgres,
                guard_events,
            };
            if wraps_only {
                let f = bench::run_wraps(&settings)?;
                print_figures(&f, json)?;
            } else {
                print_figures(&bench::run(&settings)?, json)?;
            }
        }
        Command::Produce(args) => produce::run(&args)?,
        Command::Offsets { command } => offsets::run(&command)?,
        Command::Redrive(args) => redrive::run(&args)?,
    }
    Ok(())
}

/// A bench's figures: one JSON object, or the table.
fn print_figures(
    f: &(impl serde::Serialize + std::fmt::Display),
    json: bool,
) -> baseline::anyhow_like::Result<()> {
    if json {
        println!("{}", serde_json::to_string(f)?);
    } else {
        println!("{f}");
    }
    Ok(())
}

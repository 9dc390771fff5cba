//! `redrive`: a dead-letter topic's letters back to the topics they came
//! from, once the bug that failed them is fixed (the library's
//! `pipeline::Redrive`; this is argument parsing and printing).

use std::time::Duration;

use xzepr_consumer::pipeline::{Redrive, DEFAULT_MAX_REDRIVES};
use xzepr_consumer::source::parse_time;

use crate::args::{parse_duration, KafkaArgs};
use crate::baseline::anyhow_like::Result;

/// `redrive`'s flags.
#[derive(Debug, clap::Args)]
pub struct RedriveArgs {
    /// The dead-letter topic to read (e.g. orders.dlq).
    #[arg(long, value_name = "TOPIC")]
    pub from: String,
    /// Produce every letter to this topic (partitioned by key) instead of the
    /// topic and partition its provenance headers name.
    #[arg(long, value_name = "TOPIC")]
    pub to: Option<String>,
    /// Only letters of this reason; repeat for more: handler, malformed,
    /// rejected_post (or the header's names: handler_failed, report_rejected).
    #[arg(long = "reason", value_name = "REASON")]
    pub reasons: Vec<String>,
    /// Only letters dead-lettered at or after this time (RFC 3339, or ms since
    /// the epoch).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Count what would be redriven; produce and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The group that keeps the redrive's place [default:
    /// xzepr-redrive.<from>, plus .<reason> per --reason].
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Pass over (and count as refused) a letter whose event was redriven
    /// this many times already.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REDRIVES)]
    pub max_redrives: u32,
    /// How long the producer tries to deliver each letter.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    pub message_timeout: Duration,
    /// Where Kafka is (--topic is not used: --from names the topic read).
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Runs `redrive`, printing what it moved by reason.
pub fn run(args: &RedriveArgs) -> Result<()> {
    let kafka = args.kafka.config("redrive")?;
    let mut redrive = Redrive::new(args.from.clone())
        .dry_run(args.dry_run)
        .max_redrives(args.max_redrives)
        .message_timeout(args.message_timeout);
    if let Some(to) = &args.to {
        redrive = redrive.to(to.clone());
    }
    if let Some(group) = &args.group {
        redrive = redrive.group(group.clone());
    }
    for r in &args.reasons {
        redrive = redrive.reason(r)?;
    }
    if let Some(t) = args.since {
        redrive = redrive.since(t);
    }
    let report = redrive.run(&kafka)?;
    println!("{report}");
    for (partition, offset) in &report.refused {
        println!("  refused: {}/{partition}/{offset}", args.from);
    }
    Ok(())
}

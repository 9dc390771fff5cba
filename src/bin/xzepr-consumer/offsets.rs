//! `offsets show` and `offsets reset`: a consumer group's committed offsets,
//! completion maps and lag, and moving them after an incident (the library's
//! `offsets::admin`; this is argument parsing and printing).

use xzepr_consumer::offsets::admin::{GroupOffsets, ResetTo};
use xzepr_consumer::source::parse_time;

use crate::args::KafkaArgs;
use crate::baseline::anyhow_like::Result;

/// `offsets`' subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum OffsetsCommand {
    /// Print the group's committed offset, completion map and lag per
    /// partition of each topic.
    Show {
        /// The consumer group.
        #[arg(long, value_name = "GROUP")]
        group: String,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Move the group's committed offsets on a topic, printing the old and new
    /// offset per partition. Refused while the group has active members (stop
    /// its consumers first); the completion map of each moved partition is
    /// cleared.
    Reset(ResetArgs),
}

/// `offsets reset`'s flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("to").required(true).args(["to_timestamp", "to_earliest", "to_latest", "shift_by"])))]
pub struct ResetArgs {
    /// The consumer group.
    #[arg(long, value_name = "GROUP")]
    pub group: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// To the first offset at or after this time: RFC 3339
    /// (2026-12-05T14:00:00Z) or milliseconds since the epoch.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to_timestamp: Option<chrono::DateTime<chrono::Utc>>,
    /// To the first offset the broker still keeps.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end: only new messages are read.
    #[arg(long)]
    pub to_latest: bool,
    /// By this many offsets from the committed one (negative: back).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub shift_by: Option<i64>,
    /// Print what would move, and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs an `offsets` subcommand.
pub fn run(command: &OffsetsCommand) -> Result<()> {
    match command {
        OffsetsCommand::Show { group, kafka } => show(group, kafka),
        OffsetsCommand::Reset(args) => reset(args),
    }
}

fn show(group: &str, kafka: &KafkaArgs) -> Result<()> {
    let config = kafka.config("offsets")?;
    let admin = GroupOffsets::connect(&config, group)?;
    println!(
        "{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}  completion map",
        "topic", "partition", "committed", "low", "high", "lag"
    );
    for topic in &config.topics {
        for p in admin.show(topic)? {
            println!(
                "{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}  {}",
                topic,
                p.partition,
                p.committed
                    .map_or_else(|| "-".to_owned(), |o| o.to_string()),
                p.low,
                p.high,
                p.lag.map_or_else(|| "-".to_owned(), |o| o.to_string()),
                p.map
            );
        }
    }
    Ok(())
}

fn reset(args: &ResetArgs) -> Result<()> {
    let to = match (
        args.to_timestamp,
        args.to_earliest,
        args.to_latest,
        args.shift_by,
    ) {
        (Some(t), ..) => ResetTo::Timestamp(t),
        (None, true, ..) => ResetTo::Earliest,
        (None, false, true, _) => ResetTo::Latest,
        (None, false, false, Some(n)) => ResetTo::ShiftBy(n),
        (None, false, false, None) => {
            return Err(
                "one of --to-timestamp, --to-earliest, --to-latest or --shift-by is required"
                    .into(),
            )
        }
    };
    let config = args.kafka.config("offsets")?;
    let [topic] = config.topics.as_slice() else {
        return Err("offsets reset moves one topic: give exactly one --topic".into());
    };
    let admin = GroupOffsets::connect(&config, &args.group)?;
    let report = admin.reset(topic, to, args.dry_run)?;
    println!(
        "{:<32} {:>9} {:>12} {:>12}  note",
        "topic", "partition", "old", "new"
    );
    for m in &report.partitions {
        let note = match (m.moves, m.map_cleared) {
            (false, _) => "unchanged",
            (true, true) => "completion map cleared",
            (true, false) => "",
        };
        println!(
            "{:<32} {:>9} {:>12} {:>12}  {}",
            report.topic,
            m.partition,
            m.old.map_or_else(|| "-".to_owned(), |o| o.to_string()),
            m.new,
            note
        );
    }
    let moved = report.partitions.iter().filter(|m| m.moves).count();
    if report.dry_run {
        println!("dry run: {moved} partition(s) would move; nothing committed");
        if !report.members_checked {
            println!(
                "note: the broker does not list the group's members, so a dry run cannot tell \
                 whether it has any; the reset itself is refused by the broker if it does"
            );
        }
    } else {
        println!("moved {moved} partition(s) of group {}", args.group);
    }
    Ok(())
}

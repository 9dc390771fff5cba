//! `tail`: print a topic's events, like `kcat -C` for XZepr CloudEvents.
//!
//! Reads with `assign`, never `subscribe`: no group is joined and nothing is
//! committed, so tailing never disturbs a consumer group's position. Each
//! message is decoded with the library's decoder; one that does not decode is
//! printed with its error (and the start of its payload), never skipped.
//!
//! Output: one JSON object per line (`topic`, `partition`, `offset`, `key`,
//! and `event` or `error`), or on a terminal a table.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Map, Value};
use xzepr_consumer::decode::{CloudEvent, Data, Decoder, DecoderConfig};

use crate::args::{type_filter, KafkaArgs};
use crate::baseline::anyhow_like::Result;

/// The start of a malformed payload shown beside its error.
const MALFORMED_PREVIEW: usize = 200;

/// `tail`'s flags.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Show only these event types: a prefix or a glob; repeat for more
    /// (malformed messages are always shown).
    #[arg(long = "type", value_name = "PREFIX_OR_GLOB")]
    pub types: Vec<String>,
    /// Start at the oldest message kept, not at the end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after printing this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Read only this partition; repeat for more [default: all].
    #[arg(long = "partition", value_name = "N")]
    pub partitions: Vec<i32>,
    /// Stop at the end of each partition as it was when `tail` started
    /// (instead of waiting for new messages).
    #[arg(long)]
    pub to_end: bool,
    /// Output format [default: table on a terminal, else json].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

/// Runs `tail` until `--count`, `--to-end`, or Ctrl-C.
pub fn tail(args: &TailArgs) -> Result<()> {
    let kafka = args.kafka.config("tail")?;
    let consumer: BaseConsumer = kafka.to_client_config()?.create()?;
    let filter = type_filter(&args.types);
    let format = args.format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Table
    } else {
        Format::Json
    });
    // (topic, partition) → the end offset when tail started (with --to-end).
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    {
        let mut tpl = TopicPartitionList::new();
        for topic in &kafka.topics {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let found: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if found.is_empty() {
                return Err(format!("topic {topic:?} has no partitions (does it exist?)").into());
            }
            for &p in &args.partitions {
                if !found.contains(&p) {
                    return Err(format!("topic {topic:?} has no partition {p}").into());
                }
            }
            for p in found {
                if !args.partitions.is_empty() && !args.partitions.contains(&p) {
                    continue;
                }
                let start = if args.from_beginning {
                    Offset::Beginning
                } else {
                    Offset::End
                };
                tpl.add_partition_offset(topic, p, start)?;
                if args.to_end {
                    let (low, high) =
                        consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                    let from = if args.from_beginning { low } else { high };
                    if high > from {
                        ends.insert((topic.clone(), p), high);
                    }
                }
            }
        }
        consumer.assign(&tpl)?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let decoder = Decoder::new(DecoderConfig::default())?;
    let mut printed = 0u64;
    if format == Format::Table {
        write_or_quit(
            &mut out,
            format_args!(
                "{:>4} {:>10}  {:<28} {:<26} {:<26} {:<20} OK\n",
                "PART", "OFFSET", "TYPE", "ID", "RECEIVER", "PLATFORM"
            ),
        )?;
    }
    let done = |printed: u64, ends: &HashMap<(String, i32), i64>| {
        args.count.is_some_and(|c| printed >= c) || (args.to_end && ends.is_empty())
    };
    while !done(printed, &ends) {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            if out.flush().is_err() {
                return Ok(());
            }
            continue;
        };
        let m = result?;
        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
        if let Some(end) = ends.get(&(topic.clone(), partition)) {
            if offset + 1 >= *end {
                ends.remove(&(topic.clone(), partition));
            }
        } else if args.to_end {
            // Past the end this partition had when tail started.
            continue;
        }
        let headers: Vec<(&str, &[u8])> = m
            .headers()
            .map(|h| h.iter().filter_map(|h| Some((h.key, h.value?))).collect())
            .unwrap_or_default();
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let payload = m.payload();
        let line = match decoder.decode_message(headers.iter().copied(), payload) {
            Ok(ev) if !filter.accepts(ev.event_type()) => continue,
            Ok(ev) => match format {
                Format::Json => {
                    let event = event_json(&ev, payload.unwrap_or_default());
                    format!(
                        "{{\"topic\":{},\"partition\":{partition},\"offset\":{offset},\"key\":{},\"event\":{event}}}\n",
                        Value::from(topic.as_str()),
                        key.map_or(Value::Null, Value::from),
                    )
                }
                Format::Table => format!(
                    "{partition:>4} {offset:>10}  {:<28} {:<26} {:<26} {:<20} {}\n",
                    ev.event_type(),
                    ev.id(),
                    ev.source_receiver_id().unwrap_or(ev.source()),
                    ev.platform_id().unwrap_or("-"),
                    ev.success().map_or("-", |s| if s { "yes" } else { "no" }),
                ),
            },
            Err(e) => {
                let preview = payload.map(|p| {
                    String::from_utf8_lossy(&p[..p.len().min(MALFORMED_PREVIEW)]).into_owned()
                });
                match format {
                    Format::Json => {
                        let mut line = json!({
                            "topic": topic, "partition": partition, "offset": offset,
                            "key": key, "error": e.to_string(), "payload": preview,
                        })
                        .to_string();
                        line.push('\n');
                        line
                    }
                    Format::Table => format!("{partition:>4} {offset:>10}  MALFORMED: {e}\n"),
                }
            }
        };
        write_or_quit(&mut out, format_args!("{line}"))?;
        printed += 1;
    }
    let _ = out.flush();
    Ok(())
}

/// Writes, turning a closed stdout (`tail | head`) into a quiet stop.
fn write_or_quit(out: &mut impl Write, args: std::fmt::Arguments<'_>) -> Result<()> {
    match out.write_fmt(args) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other?),
    }
}

/// The event as one line of JSON: a structured payload as it is (whitespace
/// outside strings removed), a binary-mode one rebuilt from its attributes.
fn event_json(ev: &CloudEvent<'_>, payload: &[u8]) -> String {
    if !matches!(ev.data(), Data::Body(_)) {
        return minify(payload);
    }
    let mut m = Map::new();
    m.insert("specversion".into(), ev.specversion().into());
    m.insert("id".into(), ev.id().into());
    m.insert("source".into(), ev.source().into());
    m.insert("type".into(), ev.event_type().into());
    for (k, v) in [
        ("subject", ev.subject()),
        ("time", ev.time()),
        ("datacontenttype", ev.datacontenttype()),
        ("dataschema", ev.dataschema()),
        ("api_version", ev.api_version()),
        ("name", ev.name()),
        ("version", ev.version()),
        ("release", ev.release()),
        ("platform_id", ev.platform_id()),
        ("package", ev.package()),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), v.into());
        }
    }
    if let Some(s) = ev.success() {
        m.insert("success".into(), s.into());
    }
    let data = ev.data().to_value().unwrap_or_else(|_| {
        Value::from(String::from_utf8_lossy(ev.data().raw().unwrap_or_default()).into_owned())
    });
    m.insert("data".into(), data);
    Value::Object(m).to_string()
}

/// Valid JSON without the whitespace between tokens (strings untouched), so a
/// pretty-printed payload still fits on one line, its members in their order.
fn minify(json: &[u8]) -> String {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_order() {
        let pretty = b"{\n  \"b\": \"a  b\\\" }\",\n  \"a\" : [1, 2]\n}";
        let one = minify(pretty);
        assert_eq!(one, r#"{"b":"a  b\" }","a":[1,2]}"#);
        let v: Value = serde_json::from_str(&one).unwrap();
        assert_eq!(v["b"], "a  b\" }");
    }

    #[test]
    fn binary_mode_events_are_rebuilt() {
        let decoder = Decoder::new(DecoderConfig::default()).unwrap();
        let headers = [
            ("ce_specversion", &b"1.0"[..]),
            ("ce_id", b"E1"),
            ("ce_source", b"src"),
            ("ce_type", b"t.x"),
            ("ce_platform_id", b"linux"),
        ];
        let body = br#"{"k": 1}"#;
        let ev = decoder
            .decode_message(headers.iter().copied(), Some(body))
            .unwrap();
        let v: Value = serde_json::from_str(&event_json(&ev, body)).unwrap();
        assert_eq!(v["id"], "E1");
        assert_eq!(v["platform_id"], "linux");
        assert_eq!(v["data"]["k"], 1);
    }
}

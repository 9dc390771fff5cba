//! Redrive: the dead letters of a topic, once the bug that failed them is
//! fixed, produced again to the topic they came from (their provenance
//! headers say which, and which partition) or to another, with their key,
//! payload and headers, less the dead-letter headers.
//!
//! It reads the dead-letter topic in a group of its own, up to the end each
//! partition had when it started, and commits that group's offset past a
//! letter only once the broker acknowledged its produce (idempotent,
//! `acks=all`); a produce that fails leaves its letter, and every later one of
//! its partition, uncommitted, for the next run. Letters it is not asked for
//! (another reason, before `since`) are passed over, and so are letters
//! redriven [`Redrive::max_redrives`] times already
//! ([`REDRIVE_COUNT_HEADER`]), so an event that keeps failing cannot loop.
//!
//! ```no_run
//! use xzepr_consumer::config::KafkaConsumerConfig;
//! use xzepr_consumer::pipeline::Redrive;
//!
//! let kafka = KafkaConsumerConfig::from_env("deployer")?;
//! let report = Redrive::new("xzepr.dev.events.dlq")
//!     .reason("handler")?
//!     .run(&kafka)?;
//! println!("{report}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::deadletter::{headers, producer_config, Why, DEAD_LETTER_PREFIXES};
use crate::config::{ConfigError, KafkaConsumerConfig};

/// How many times an event has been redriven, on the record produced (and so
/// on its next dead letter, which keeps the event's own headers).
pub const REDRIVE_COUNT_HEADER: &str = "xzepr.redrive.count";

/// Default [`Redrive::max_redrives`]: a fix that did not fix it shows after
/// one or two redrives; past three, the event needs a person.
pub const DEFAULT_MAX_REDRIVES: u32 = 3;

/// Produces waiting for their acknowledgement. 1,024: enough to keep a
/// broker round trip per batch rather than per letter; each holds a letter's
/// copy in librdkafka's queue until acknowledged.
const IN_FLIGHT: usize = 1024;

/// Longest wait for each broker request (metadata, watermarks, committed
/// offsets, commit), and for a fetch that brings nothing while letters below
/// the start's end offsets are still unread.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the redrive group's offsets are committed while it runs.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Redrive errors. What was acknowledged before the error is committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedriveError {
    /// A setting was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A request to the brokers failed.
    #[error("{what}")]
    Kafka {
        /// What was asked.
        what: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The dead-letter topic does not exist.
    #[error("topic {topic:?} does not exist")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// A letter says not where it came from, and no `to` topic was given.
    #[error(
        "dead letter {partition}/{offset} has no provenance headers: give a topic to redrive to"
    )]
    NoProvenance {
        /// Its partition in the dead-letter topic.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// The broker did not take a letter: it and the letters after it in its
    /// partition stay uncommitted, to be redriven by the next run.
    #[error("dead letter {partition}/{offset} could not be produced to {topic}")]
    Produce {
        /// Its partition in the dead-letter topic.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// Where it was going.
        topic: String,
        /// The producer's error.
        #[source]
        source: KafkaError,
    },
}

/// A redrive of one dead-letter topic: [`Redrive::new`], its filters, then
/// [`Redrive::run`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Redrive {
    from: String,
    to: Option<String>,
    group: Option<String>,
    reasons: Vec<&'static str>,
    since: Option<DateTime<Utc>>,
    dry_run: bool,
    max_redrives: u32,
    message_timeout: Duration,
}

impl Redrive {
    /// Redrives every letter of `from` to where it came from.
    pub fn new(from: impl Into<String>) -> Self {
        Redrive {
            from: from.into(),
            to: None,
            group: None,
            reasons: Vec::new(),
            since: None,
            dry_run: false,
            max_redrives: DEFAULT_MAX_REDRIVES,
            message_timeout: Duration::from_secs(30),
        }
    }

    /// Produces every letter to `topic` (partitioned by key) instead of its
    /// original topic and partition.
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.to = Some(topic.into());
        self
    }

    /// The group whose committed offsets say how far the redrive got
    /// (default `xzepr-redrive.<from>`, with `.<reason>` for each reason
    /// asked for: a redrive of one reason passes over the others' letters, so
    /// it keeps its own place).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Only letters of this reason (repeat for more): `handler` or
    /// `handler_failed`, `malformed`, `rejected_post` or `report_rejected`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `reason` for another name.
    pub fn reason(mut self, reason: &str) -> Result<Self, ConfigError> {
        let why = match reason.trim().to_ascii_lowercase().as_str() {
            "handler" => Why::HandlerFailed,
            "rejected_post" | "rejected" => Why::ReportRejected,
            name => Why::ALL
                .into_iter()
                .find(|w| w.as_str() == name)
                .ok_or_else(|| ConfigError::Invalid {
                    name: "reason",
                    value: reason.to_owned(),
                    expected:
                        "handler (handler_failed), malformed, or rejected_post (report_rejected)",
                })?,
        };
        if !self.reasons.contains(&why.as_str()) {
            self.reasons.push(why.as_str());
        }
        Ok(self)
    }

    /// Only letters dead-lettered at or after `t` (their time header, else
    /// the record's timestamp).
    pub fn since(mut self, t: DateTime<Utc>) -> Self {
        self.since = Some(t);
        self
    }

    /// Reads and counts, and produces and commits nothing.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// A letter whose event was redriven this many times already is passed
    /// over (counted as refused). Default [`DEFAULT_MAX_REDRIVES`]; at least 1.
    pub fn max_redrives(mut self, n: u32) -> Self {
        self.max_redrives = n;
        self
    }

    /// How long the producer tries to deliver each letter (default 30 s).
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// The group this redrive commits in.
    pub fn group_id(&self) -> String {
        self.group.clone().unwrap_or_else(|| {
            let mut g = format!("xzepr-redrive.{}", self.from);
            for r in &self.reasons {
                g.push('.');
                g.push_str(r);
            }
            g
        })
    }

    /// Redrives the letters there are now (up to each partition's end when it
    /// starts), on `kafka`'s cluster and credentials. Blocks until done.
    ///
    /// # Errors
    /// [`ConfigError`] for a bad setting; [`RedriveError::NoProvenance`] or
    /// [`RedriveError::Produce`] for a letter that could not be redriven (the
    /// acknowledged ones before it are committed); [`RedriveError::Kafka`] or
    /// [`RedriveError::UnknownTopic`] for the dead-letter topic.
    pub fn run(&self, kafka: &KafkaConsumerConfig) -> Result<RedriveReport, RedriveError> {
        if self.from.trim().is_empty() {
            return Err(ConfigError::Empty { name: "from" }.into());
        }
        if self.to.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ConfigError::Empty { name: "to" }.into());
        }
        if self.max_redrives == 0 {
            return Err(ConfigError::Invalid {
                name: "max_redrives",
                value: "0".to_owned(),
                expected: "at least 1",
            }
            .into());
        }
        let group = self.group_id();
        let mut reader = kafka.clone();
        reader.group_id.clone_from(&group);
        let consumer: BaseConsumer = reader
            .to_client_config()?
            .create()
            .map_err(kafka_err("creating the reader"))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let producer: ThreadedProducer<Acks> =
            producer_config(kafka, "redrive", self.message_timeout)?
                .create_with_context(Acks(tx))
                .map_err(kafka_err("creating the producer"))?;
        let ends = start(&consumer, &self.from)?;
        let mut run = Run {
            redrive: self,
            consumer: &consumer,
            producer: &producer,
            acks: rx,
            queue: VecDeque::new(),
            results: HashMap::new(),
            seq: 0,
            next: HashMap::new(),
            failed: None,
            stopped: HashSet::new(),
            report: RedriveReport {
                group,
                dry_run: self.dry_run,
                ..RedriveReport::default()
            },
        };
        let outcome = run.read(ends);
        let flushed = run.settle_all();
        let committed = run.commit();
        let report = run.report;
        outcome.and(flushed).and(committed)?;
        Ok(report)
    }
}

fn kafka_err(what: &'static str) -> impl FnOnce(KafkaError) -> RedriveError {
    move |source| RedriveError::Kafka { what, source }
}

/// What a redrive did, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveReport {
    /// The group it committed in.
    pub group: String,
    /// Whether it only counted.
    pub dry_run: bool,
    /// Letters produced (and acknowledged), by reason.
    pub moved: BTreeMap<String, u64>,
    /// Letters produced, by topic they went to.
    pub to_topics: BTreeMap<String, u64>,
    /// Letters passed over as redriven too often: `(partition, offset)`.
    pub refused: Vec<(i32, i64)>,
    /// Letters passed over by the filters.
    pub skipped: u64,
}

impl fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would redrive"
        } else {
            "redrove"
        };
        let total: u64 = self.moved.values().sum();
        write!(f, "{verb} {total} dead letter(s) (group {})", self.group)?;
        for (reason, n) in &self.moved {
            write!(f, "\n  {reason}: {n}")?;
        }
        for (topic, n) in &self.to_topics {
            write!(f, "\n  to {topic}: {n}")?;
        }
        if !self.refused.is_empty() {
            write!(f, "\n  refused, redriven too often: {}", self.refused.len())?;
        }
        if self.skipped > 0 {
            write!(f, "\n  passed over by the filters: {}", self.skipped)?;
        }
        Ok(())
    }
}

/// The producer's context: each acknowledgement (or failure), by sequence.
struct Acks(Sender<(usize, Result<(), KafkaError>)>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let result = result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone());
        // The receiver goes only once every acknowledgement was awaited.
        let _ = self.0.send((seq, result));
    }
}

/// Assigns every partition of `topic` from the group's committed offsets
/// (the start when none), returning each partition's end offset now.
fn start(consumer: &BaseConsumer, topic: &str) -> Result<HashMap<i32, i64>, RedriveError> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(kafka_err("reading the dead-letter topic's metadata"))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    drop(md);
    if parts.is_empty() {
        return Err(RedriveError::UnknownTopic {
            topic: topic.to_owned(),
        });
    }
    let mut ask = TopicPartitionList::new();
    for &p in &parts {
        ask.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(ask, REQUEST_TIMEOUT)
        .map_err(kafka_err("reading the redrive group's offsets"))?;
    let mut assign = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for e in committed.elements() {
        let at = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), REQUEST_TIMEOUT)
            .map_err(kafka_err("reading the dead-letter topic's end offsets"))?;
        let from = match at {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if from < high {
            ends.insert(e.partition(), high);
            assign
                .add_partition_offset(topic, e.partition(), at)
                .map_err(kafka_err("assigning the dead-letter topic"))?;
        }
    }
    drop(committed);
    consumer
        .assign(&assign)
        .map_err(kafka_err("assigning the dead-letter topic"))?;
    Ok(ends)
}

/// A letter read, in read order, until its offset may be committed.
struct Entry {
    partition: i32,
    offset: i64,
    /// `Some(seq)` while its produce is unacknowledged; `None`: done (moved,
    /// or passed over).
    seq: Option<usize>,
    reason: String,
    topic: String,
}

/// One redrive's state.
struct Run<'a> {
    redrive: &'a Redrive,
    consumer: &'a BaseConsumer,
    producer: &'a ThreadedProducer<Acks>,
    acks: Receiver<(usize, Result<(), KafkaError>)>,
    queue: VecDeque<Entry>,
    results: HashMap<usize, Result<(), KafkaError>>,
    seq: usize,
    /// Per partition, the next offset to commit.
    next: HashMap<i32, i64>,
    /// The first letter that failed.
    failed: Option<RedriveError>,
    /// Partitions with a letter that failed: they commit no further.
    stopped: HashSet<i32>,
    report: RedriveReport,
}

impl Run<'_> {
    /// Reads every letter below `ends`, producing those asked for.
    fn read(&mut self, mut ends: HashMap<i32, i64>) -> Result<(), RedriveError> {
        let consumer = self.consumer;
        let mut last_commit = Instant::now();
        let mut idle_since = Instant::now();
        while !ends.is_empty() && self.failed.is_none() {
            if last_commit.elapsed() >= COMMIT_EVERY {
                self.settle(false)?;
                self.commit()?;
                last_commit = Instant::now();
            }
            let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
                // The last offsets below an end may be no letter to read (a
                // transaction's marker): the position says it is reached.
                if let Ok(at) = consumer.position() {
                    for e in at.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            if ends.get(&e.partition()).is_some_and(|&end| o >= end) {
                                ends.remove(&e.partition());
                            }
                        }
                    }
                }
                if !ends.is_empty() && idle_since.elapsed() > REQUEST_TIMEOUT {
                    return Err(kafka_err("reading the dead letters")(
                        KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut),
                    ));
                }
                continue;
            };
            idle_since = Instant::now();
            let m = polled.map_err(kafka_err("reading the dead letters"))?;
            let (partition, offset) = (m.partition(), m.offset());
            let Some(&end) = ends.get(&partition) else {
                continue;
            };
            if offset >= end {
                continue;
            }
            self.letter(&m)?;
            drop(m);
            if offset + 1 >= end {
                ends.remove(&partition);
            }
            self.settle(self.queue.len() >= IN_FLIGHT)?;
        }
        Ok(())
    }

    /// Classifies one letter and produces it if it is asked for.
    fn letter(&mut self, m: &BorrowedMessage<'_>) -> Result<(), RedriveError> {
        let (partition, offset) = (m.partition(), m.offset());
        let header = |name: &str| -> Option<String> {
            m.headers()?
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let reason = header(headers::REASON).unwrap_or_else(|| "unknown".to_owned());
        let when = header(headers::TIME)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                m.timestamp()
                    .to_millis()
                    .and_then(DateTime::from_timestamp_millis)
            });
        let wanted = (self.redrive.reasons.is_empty()
            || self.redrive.reasons.iter().any(|r| *r == reason))
            && self
                .redrive
                .since
                .is_none_or(|s| when.is_some_and(|w| w >= s));
        let done = |topic: String| Entry {
            partition,
            offset,
            seq: None,
            reason: String::new(),
            topic,
        };
        if !wanted {
            self.report.skipped += 1;
            self.queue.push_back(done(String::new()));
            return Ok(());
        }
        let count: u32 = header(REDRIVE_COUNT_HEADER)
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        if count >= self.redrive.max_redrives {
            tracing::warn!(
                partition,
                offset,
                count,
                "Dead letter redriven too often: passed over."
            );
            self.report.refused.push((partition, offset));
            self.queue.push_back(done(String::new()));
            return Ok(());
        }
        let (topic, to_partition) = match &self.redrive.to {
            Some(t) => (t.clone(), None),
            None => {
                let topic = header(headers::TOPIC)
                    .or_else(|| header("__connect.errors.topic"))
                    .ok_or(RedriveError::NoProvenance { partition, offset })?;
                let p = header(headers::PARTITION).and_then(|p| p.trim().parse::<i32>().ok());
                (topic, p)
            }
        };
        if self.redrive.dry_run {
            self.count(&reason, &topic);
            self.queue.push_back(done(topic));
            return Ok(());
        }
        let mut h = OwnedHeaders::new();
        let ours = |k: &str| {
            k == REDRIVE_COUNT_HEADER || DEAD_LETTER_PREFIXES.iter().any(|p| k.starts_with(p))
        };
        if let Some(original) = m.headers() {
            for o in original.iter().filter(|o| !ours(o.key)) {
                h = h.insert(o);
            }
        }
        let next = (count + 1).to_string();
        h = h.insert(Header {
            key: REDRIVE_COUNT_HEADER,
            value: Some(next.as_bytes()),
        });
        let seq = self.seq;
        self.seq += 1;
        let mut record = BaseRecord::with_opaque_to(&topic, seq).headers(h);
        if let Some(p) = to_partition {
            record = record.partition(p);
        }
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.settle(true)?;
                }
                Err((source, _)) => {
                    return Err(RedriveError::Produce {
                        partition,
                        offset,
                        topic: topic.clone(),
                        source,
                    })
                }
            }
        }
        self.queue.push_back(Entry {
            partition,
            offset,
            seq: Some(seq),
            reason,
            topic,
        });
        Ok(())
    }

    fn count(&mut self, reason: &str, topic: &str) {
        *self.report.moved.entry(reason.to_owned()).or_default() += 1;
        *self.report.to_topics.entry(topic.to_owned()).or_default() += 1;
    }

    /// Takes in acknowledgements (waiting for the oldest with `wait`) and
    /// moves each partition's commit point over the letters done in order.
    fn settle(&mut self, mut wait: bool) -> Result<(), RedriveError> {
        loop {
            while let Ok((seq, r)) = self.acks.try_recv() {
                self.results.insert(seq, r);
            }
            while let Some(front) = self.queue.front() {
                let result = match front.seq {
                    None => None,
                    Some(seq) => match self.results.remove(&seq) {
                        Some(r) => Some(r),
                        None => break,
                    },
                };
                let Some(e) = self.queue.pop_front() else {
                    break;
                };
                if self.stopped.contains(&e.partition) {
                    continue;
                }
                match result {
                    Some(Err(source)) => {
                        self.stopped.insert(e.partition);
                        tracing::warn!(partition = e.partition, offset = e.offset, topic = %e.topic, error = %source, "Dead letter not produced: it and the rest of its partition stay uncommitted.");
                        self.failed.get_or_insert(RedriveError::Produce {
                            partition: e.partition,
                            offset: e.offset,
                            topic: e.topic,
                            source,
                        });
                    }
                    Some(Ok(())) => {
                        self.count(&e.reason, &e.topic);
                        self.next.insert(e.partition, e.offset + 1);
                    }
                    None => {
                        self.next.insert(e.partition, e.offset + 1);
                    }
                }
            }
            if !wait || self.queue.front().is_none_or(|e| e.seq.is_none()) {
                return Ok(());
            }
            match self
                .acks
                .recv_timeout(self.redrive.message_timeout + REQUEST_TIMEOUT)
            {
                Ok((seq, r)) => {
                    self.results.insert(seq, r);
                }
                Err(_) => {
                    return Err(kafka_err("waiting for the broker's acknowledgements")(
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                    ))
                }
            }
            wait = self.queue.len() >= IN_FLIGHT;
        }
    }

    /// Waits for every produce still unacknowledged.
    fn settle_all(&mut self) -> Result<(), RedriveError> {
        while self.queue.iter().any(|e| e.seq.is_some()) {
            self.settle(true)?;
        }
        self.settle(false)?;
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Commits each partition's commit point (nothing on a dry run).
    fn commit(&mut self) -> Result<(), RedriveError> {
        if self.redrive.dry_run || self.next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in &self.next {
            tpl.add_partition_offset(&self.redrive.from, p, Offset::Offset(o))
                .map_err(kafka_err("committing the redrive group's offsets"))?;
        }
        let r = self.consumer.commit(&tpl, CommitMode::Sync);
        drop(tpl);
        r.map_err(kafka_err("committing the redrive group's offsets"))?;
        self.next.clear();
        Ok(())
    }
}

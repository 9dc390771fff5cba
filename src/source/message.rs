//! [`Message`]: one message copied out of librdkafka, how it finishes or holds
//! its offset, and the pool its buffer returns to.

use std::sync::atomic::{AtomicU64, Ordering::Acquire};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::completion::{send_completion, Completion};
use crate::dispatch::lanes::Item;

/// A message copied out of librdkafka, with what it needs to finish itself.
///
/// Dropping it unfinished **holds** its offset (see [`Message::hold`]).
#[derive(Debug)]
pub struct Message {
    /// Payload then key, in one buffer taken from (and given back to) the
    /// source's pool: the one copy out of librdkafka, never freed on a thread
    /// other than the one that allocated it (glibc's arenas lock on that).
    pub(super) data: Vec<u8>,
    /// Payload length; `None` for a null payload.
    pub(super) payload_len: Option<usize>,
    /// Whether there is a key (the rest of `data`).
    pub(super) has_key: bool,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The record's timestamp and its type, when the broker gave one.
    pub timestamp: Option<Timestamp>,
    pub(super) epoch: u64,
    pub(super) shared: Arc<PartShared>,
    pub(super) completed: bool,
}

/// A Kafka record's timestamp, in milliseconds since the epoch, by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamp {
    /// Set by the producer (the topic's `message.timestamp.type=CreateTime`).
    CreateTime(i64),
    /// Set by the broker when it appended the record (`LogAppendTime`).
    LogAppendTime(i64),
}

impl Timestamp {
    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        match self {
            Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => ms,
        }
    }

    /// `CreateTime` or `LogAppendTime`, as Kafka names the type.
    pub fn kind(self) -> &'static str {
        match self {
            Timestamp::CreateTime(_) => "CreateTime",
            Timestamp::LogAppendTime(_) => "LogAppendTime",
        }
    }

    pub(crate) fn of(t: rdkafka::Timestamp) -> Option<Self> {
        match t {
            rdkafka::Timestamp::CreateTime(ms) => Some(Timestamp::CreateTime(ms)),
            rdkafka::Timestamp::LogAppendTime(ms) => Some(Timestamp::LogAppendTime(ms)),
            rdkafka::Timestamp::NotAvailable => None,
        }
    }
}

/// Per-partition state a message needs to finish itself: one `Arc` per message.
#[derive(Debug)]
pub(crate) struct PartShared {
    /// The partition's current epoch; bumped on revoke.
    pub(super) current: AtomicU64,
    pub(super) done: Sender<Completion>,
    /// Cancelled when the partition's drain deadline passes: running async
    /// handlers stop, and their offsets stay unfinished.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Where finished messages give their buffer back.
    pub(crate) recycle: Arc<Recycler>,
}

/// Message buffers given back by finished messages and reused by the poll
/// thread's copy, so a buffer is allocated and freed on one thread (glibc's
/// malloc locks the owning arena when another thread frees into it, and the
/// poll thread then waits on the workers). Holds at most `cap` bytes of
/// capacity, the buffer budget, so an idle consumer keeps no more than what a
/// busy one is allowed to buffer.
#[derive(Debug)]
pub(crate) struct Recycler {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    bytes: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl Recycler {
    pub(crate) fn new(cap: usize) -> Self {
        // The count bound only sizes the channel; the byte cap is the limit.
        let (tx, rx) = crossbeam_channel::bounded(65_536);
        Recycler {
            tx,
            rx,
            bytes: std::sync::atomic::AtomicUsize::new(0),
            cap,
        }
    }

    /// A buffer to copy into (empty, maybe with capacity).
    pub(crate) fn take(&self) -> Vec<u8> {
        match self.rx.try_recv() {
            Ok(buf) => {
                self.bytes
                    .fetch_sub(buf.capacity(), std::sync::atomic::Ordering::Relaxed);
                buf
            }
            Err(_) => Vec::new(),
        }
    }

    fn give(&self, mut buf: Vec<u8>) {
        let n = buf.capacity();
        let held = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        if n == 0 || held + n > self.cap {
            return;
        }
        buf.clear();
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(buf) {
            self.bytes.fetch_sub(
                e.into_inner().capacity(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

impl Message {
    /// The payload (the one copy; decoders borrow from it).
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload_len.map(|n| &self.data[..n])
    }

    /// The key.
    pub fn key(&self) -> Option<&[u8]> {
        self.has_key
            .then(|| &self.data[self.payload_len.unwrap_or(0)..])
    }

    /// Headers as `(key, value)` pairs, for binary-mode decoding.
    pub fn header_pairs(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// False once this message's partition was revoked (or reassigned) after it
    /// was handed over: its work must not run, the new owner has it.
    pub fn is_current(&self) -> bool {
        self.shared.current.load(Acquire) == self.epoch
    }

    /// Marks the offset finished. Its partition's commit point passes it once every
    /// earlier offset has finished too.
    pub fn finish(mut self) {
        self.complete(false);
    }

    /// Marks the offset held: it will not finish in this assignment, so the
    /// commit point stays at or before it (a restart or the next owner reads it
    /// again), but revoke and shutdown no longer wait for it.
    pub fn hold(mut self) {
        self.complete(true);
    }

    fn complete(&mut self, held: bool) {
        self.completed = true;
        send_completion(
            &self.shared.done,
            Completion::Offset {
                topic: Arc::clone(&self.topic),
                partition: self.partition,
                offset: self.offset,
                epoch: self.epoch,
                held,
            },
        );
    }
}

impl Drop for Message {
    /// Holds the offset at once, so a panicking path or a cancelled future never
    /// makes a drain wait for a message nobody will finish; gives the buffer
    /// back to the source's pool.
    fn drop(&mut self) {
        if !self.completed {
            self.complete(true);
        }
        self.shared.recycle.give(std::mem::take(&mut self.data));
    }
}

impl Item for Message {
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
    fn cost(&self) -> usize {
        cost_of(self.data.len())
    }
}

/// What a message of `data` bytes (payload and key) counts in the buffer
/// budget: its bytes and its bookkeeping.
pub(crate) fn cost_of(data: usize) -> usize {
    const BOOKKEEPING: usize = 128;
    data + BOOKKEEPING
}

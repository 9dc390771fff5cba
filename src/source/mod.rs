//! The source stage: one OS thread owns the Kafka consumer, copies each payload
//! once, puts every message in its lane, and hands the lanes' jobs to an
//! executor; finished offsets and released lanes come back over one channel, and
//! finished offsets are committed as a contiguous run per partition.
//!
//! ```text
//!             ┌───────────────────── poll thread ─────────────────────┐
//!  Kafka ───> │ poll burst ─> copy ─> track ─> lanes (dispatch::lanes) │ ──Batch──> executor
//!             │    ^ pause/resume        trackers <──┬── completions <─┼── Message::finish / drop
//!             │    └── commit (async / sync)    lanes <──┘   releases <─┼── Batch dropped
//!             └────────────────────────────────────────────────────────┘
//! ```
//!
//! The thread never blocks on the executor: a job is handed over only when there
//! is room under [`SourceOptions::max_in_flight`], and everything else waits in
//! its lane. Every message counts against [`SourceOptions::buffer_budget`] and
//! [`SourceOptions::max_buffered`] from its arrival until its job's lane is
//! released; over either, the thread stops polling until the buffers are down
//! to half, and if that takes longer than [`SourceOptions::pause_after`] it
//! **pauses** the partitions and polls on, so rebalances are served, resuming
//! them once the buffers are down to half. Memory is therefore bounded by the
//! budget plus one poll burst, beside librdkafka's own bounded prefetch.
//!
//! On revoke, the revoked partitions' waiting messages are dropped (never
//! started; the new owner reads them), their running work is given up to
//! [`SourceOptions::drain_timeout`], their contiguous point is committed
//! synchronously, and what still runs is cancelled (async handlers) or marked
//! stale (queued sync batches are dropped unhandled). Shutdown does the same for
//! every partition.
//!
//! A [`Message`] finishes its offset with [`Message::finish`], holds it with
//! [`Message::hold`], and **holds it when dropped** unfinished (a panic, a
//! cancelled future): the commit point stays before it, but revoke and shutdown
//! do not wait for it.

mod age;
mod batch;
mod completion;
mod error;
mod handle;
mod message;
mod options;
mod poll;
mod stall;
mod start;
mod stats;
mod watch;

pub use batch::Batch;
pub(crate) use batch::{ChannelExecutor, Executor};
pub(crate) use completion::{deferring, Completion};
pub use error::SourceError;
pub(crate) use handle::{panic_message, Committed};
pub use handle::{Source, SourceHandle};
pub use message::{Message, Timestamp};
pub(crate) use message::{PartShared, Recycler};
pub use options::{Assignment, SourceOptions};
pub(crate) use poll::{RebalanceHooks, NOT_BEFORE_HEADER};
pub use stall::PartitionState;
pub(crate) use start::offsets_at;
pub use start::{parse_time, StartFrom};
pub use stats::SourceStats;
pub use watch::PartitionProgress;

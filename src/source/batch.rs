//! [`Batch`]: one lane's messages handed to the executor as a job, and the
//! [`Executor`] seam that takes it.

use crossbeam_channel::Sender;

#[cfg(doc)]
use super::completion::deferring;
use super::completion::{send_completion, Completion, Deferral};
use super::Message;
use crate::dispatch::lanes::LaneId;

/// Messages of one lane to handle **in order**, one at a time; dropping the
/// batch releases the lane, so its next messages may run. Messages left in it
/// when it is dropped are held.
#[derive(Debug)]
pub struct Batch {
    pub(super) items: std::collections::VecDeque<Message>,
    pub(super) lane: LaneId,
    pub(super) done: Sender<Completion>,
}

impl Batch {
    /// Messages not yet taken.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when every message was taken.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// For [`deferring`] the job that runs this batch.
    pub(crate) fn deferral(&self) -> Deferral {
        Deferral {
            expected: self.len() + 1,
        }
    }

    /// Cancelled once the batch's partition passed its drain deadline (`None`
    /// for an empty batch).
    pub(crate) fn cancellation(&self) -> Option<tokio_util::sync::CancellationToken> {
        self.items.front().map(|m| m.shared.cancel.clone())
    }
}

impl Iterator for Batch {
    type Item = Message;
    fn next(&mut self) -> Option<Message> {
        self.items.pop_front()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Messages first: their holds reach the poll thread before the release.
        self.items.clear();
        let items = Vec::from(std::mem::take(&mut self.items));
        send_completion(&self.done, Completion::Release(self.lane, items));
    }
}

/// Where the poll thread hands jobs. Never blocks: the scheduler hands over at
/// most `max_in_flight` jobs, so a bounded channel of that size never fills.
pub(crate) trait Executor: Send + 'static {
    /// Runs `batch`; gives it back when the executor is gone.
    fn execute(&self, batch: Batch) -> Result<(), Batch>;
}

/// The raw source's executor: a channel that any number of threads read.
#[derive(Debug)]
pub(crate) struct ChannelExecutor(pub(crate) Sender<Batch>);

impl Executor for ChannelExecutor {
    fn execute(&self, batch: Batch) -> Result<(), Batch> {
        use crossbeam_channel::TrySendError;
        match self.0.try_send(batch) {
            Ok(()) => Ok(()),
            // Only a channel with no reader means the workers are gone. The
            // scheduler counts every job until its release (a revoked
            // partition's too), so the channel, sized `max_in_flight`, has room
            // for every job it hands out; should it be full all the same, the
            // workers are alive and taking jobs, so wait for one.
            Err(TrySendError::Full(batch)) => self.0.send(batch).map_err(|e| e.into_inner()),
            Err(TrySendError::Disconnected(batch)) => Err(batch),
        }
    }
}

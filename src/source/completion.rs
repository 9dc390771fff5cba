//! What comes back to the poll thread ([`Completion`]), and how a job's
//! completions are deferred and sent as one.

use std::sync::Arc;

use crossbeam_channel::Sender;

#[cfg(doc)]
use super::Batch;
use super::Message;
use crate::dispatch::lanes::LaneId;

thread_local! {
    /// Completions held back on this thread while a [`DeferCompletions`] guard
    /// lives, sent as one.
    static DEFERRED: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

/// What a [`DeferCompletions`] guard holds back. The channel and the vector
/// come with the first completion: most polls of a waiting job finish
/// nothing, and they cost no allocation and no sender clone.
struct Held {
    expected: usize,
    held: Option<(Sender<Completion>, Vec<Completion>)>,
}

/// Sends `c` to the poll thread, or holds it back while this thread defers.
pub(super) fn send_completion(done: &Sender<Completion>, c: Completion) {
    let c = DEFERRED.with(|d| match &mut *d.borrow_mut() {
        Some(Held { expected, held }) => match held {
            Some((to, held)) if to.same_channel(done) => {
                held.push(c);
                None
            }
            Some(_) => Some(c),
            None => {
                let mut v = Vec::with_capacity(*expected);
                v.push(c);
                *held = Some((done.clone(), v));
                None
            }
        },
        None => Some(c),
    });
    if let Some(c) = c {
        // The poll thread may be gone (shutdown): then nothing is committed, and
        // the offset is replayed, which is the safe side.
        let _ = done.send(c);
    }
}

/// While it lives, completions made on this thread (finished offsets, released
/// lanes) are held back and sent as one when it drops: a worker running a job
/// of 64 events wakes the poll thread once, not 65 times. Used per poll of a
/// job ([`deferring`]).
struct DeferCompletions(());

impl DeferCompletions {
    fn new(expected: usize) -> Self {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(Held {
                    expected,
                    held: None,
                });
            }
        });
        DeferCompletions(())
    }
}

/// Where a job's deferred completions go ([`Batch::deferral`]).
pub(crate) struct Deferral {
    pub(super) expected: usize,
}

/// Runs a job's future with its completions deferred during each poll: what
/// finishes within one poll (often the whole job) reaches the poll thread as
/// one message. A guard per poll, never across an `.await`, so it suits tasks
/// that move between threads and jobs that wait.
///
/// It takes the job pinned where it is: moving a job's future into another
/// would store it twice, and a future's size is copied on every spawn.
pub(crate) fn deferring<F: std::future::Future>(
    to: Deferral,
    mut job: std::pin::Pin<&mut F>,
) -> impl std::future::Future<Output = F::Output> + '_ {
    std::future::poll_fn(move |cx| {
        let _defer = DeferCompletions::new(to.expected);
        job.as_mut().poll(cx)
    })
}

impl Drop for DeferCompletions {
    fn drop(&mut self) {
        let held = DEFERRED
            .with(|d| d.borrow_mut().take())
            .and_then(|h| h.held);
        if let Some((to, held)) = held {
            let _ = to.send(Completion::Many(held));
        }
    }
}

/// What comes back to the poll thread.
#[derive(Debug)]
pub(crate) enum Completion {
    /// Several, from one job (see [`DeferCompletions`]).
    Many(Vec<Completion>),
    Offset {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
        held: bool,
    },
    /// A job finished; its emptied vector comes back for reuse.
    Release(LaneId, Vec<Message>),
}

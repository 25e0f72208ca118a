//! Group commit of issued-token records.
//!
//! Every issued token is stored durably before its response leaves, and a
//! durable SQLite commit costs one fsync (1 ms on the disk of the machine
//! in docs/BENCHMARKS.md). Issuances that arrive while a commit runs wait
//! in a queue. When that commit ends, the first of them becomes the writer
//! and stores the whole queue in one transaction. Under load many
//! issuances share one fsync, and a lone issuance commits at once.
//!
//! The callers are threads of the blocking pool, so waiting blocks.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::ServiceError;
use crate::token_server::store::{AuditEvent, IssuedToken, StoreError};

/// One issued token and its audit event.
pub(super) type IssueRecord = (IssuedToken, AuditEvent);

/// Message sent to a waiting issuance.
enum Turn {
    /// Its record was written in another thread's batch, with this outcome.
    Done(Result<(), ServiceError>),
    /// It is now the writer of the next batch.
    Write,
}

struct Pending {
    id: u64,
    record: IssueRecord,
    reply: SyncSender<Turn>,
}

#[derive(Default)]
struct State {
    queue: Vec<Pending>,
    next_id: u64,
    /// Whether a thread is writing a batch or has received `Turn::Write`.
    writing: bool,
}

/// The queue of records waiting for a commit.
#[derive(Default)]
pub(super) struct GroupCommit {
    state: Mutex<State>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `record` through `write`, possibly in one batch with records
    /// of other threads, and returns once it is committed or failed.
    pub(super) fn record<W>(&self, record: IssueRecord, write: W) -> Result<(), ServiceError>
    where
        W: Fn(&[IssueRecord]) -> Result<(), StoreError>,
    {
        let (reply, turn) = sync_channel(1);
        let own_id = {
            let mut state = self.state();
            let id = state.next_id;
            state.next_id = state.next_id.wrapping_add(1);
            state.queue.push(Pending { id, record, reply });
            let wait = state.writing;
            state.writing = true;
            if wait {
                drop(state);
                match wait_for_turn(&turn) {
                    Turn::Done(outcome) => return outcome,
                    Turn::Write => {}
                }
            }
            id
        };
        self.write_batch(own_id, write)
    }

    /// Writes every queued record in one transaction, sends the other
    /// threads of the batch their outcome and hands the writer's role to
    /// the next waiting thread, if any.
    fn write_batch<W>(&self, own_id: u64, write: W) -> Result<(), ServiceError>
    where
        W: Fn(&[IssueRecord]) -> Result<(), StoreError>,
    {
        let batch = std::mem::take(&mut self.state().queue);
        let mut records = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for pending in batch {
            records.push(pending.record);
            replies.push((pending.id, pending.reply));
        }

        // A panic in `write` becomes an error for the whole batch, so the
        // writer's role is still handed on and no waiter is left behind.
        // The conversion logs a failure once, for the whole batch.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| write(&records)))
            .unwrap_or_else(|_| {
                Err(StoreError::Backend(
                    "storing issued tokens panicked".to_owned(),
                ))
            })
            .map_err(ServiceError::from);

        for (id, reply) in replies {
            if id != own_id {
                // A waiter cannot have gone: it blocks until it gets a message.
                let _ = reply.send(Turn::Done(outcome.clone()));
            }
        }

        let mut state = self.state();
        match state.queue.first() {
            // The next writer is woken with the lock held, so no new
            // arrival can slip in between and find no writer.
            Some(next) => {
                let _ = next.reply.send(Turn::Write);
            }
            None => state.writing = false,
        }
        outcome
    }
}

fn wait_for_turn(turn: &Receiver<Turn>) -> Turn {
    turn.recv().unwrap_or_else(|_| {
        // Only a panicking writer drops a sender without replying.
        Turn::Done(Err(ServiceError::new(
            super::ErrorKind::Internal,
            "internal",
            "the thread storing this token failed; see the server log and retry",
        )))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    fn record(n: u64) -> IssueRecord {
        (
            IssuedToken {
                token_id: format!("{n:032x}"),
                source_id: "src".to_owned(),
                server: "server-a".to_owned(),
                application: "inventory".to_owned(),
                key_id: "key".to_owned(),
                issued_at: n,
                expires_at: n + 60,
            },
            AuditEvent::new(n, "issue", "src", format!("token {n}")),
        )
    }

    /// Many threads at once: every record is written exactly once, and
    /// slow commits make later records share batches.
    #[test]
    fn concurrent_records_share_commits() {
        let commits = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(Mutex::new(Vec::new()));
        let group = Arc::new(GroupCommit::default());
        let threads = 16;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads as u64)
            .map(|n| {
                let (commits, written, group, start) = (
                    commits.clone(),
                    written.clone(),
                    group.clone(),
                    start.clone(),
                );
                std::thread::spawn(move || {
                    start.wait();
                    group.record(record(n), |batch| {
                        std::thread::sleep(Duration::from_millis(20));
                        commits.fetch_add(1, Ordering::SeqCst);
                        let mut written = written.lock().unwrap();
                        written.extend(batch.iter().map(|(token, _)| token.issued_at));
                        Ok(())
                    })
                })
            })
            .collect();

        for handle in handles {
            handle.join().unwrap().unwrap();
        }

        let mut written = written.lock().unwrap().clone();
        written.sort_unstable();
        assert_eq!(written, (0..threads as u64).collect::<Vec<_>>());
        let commits = commits.load(Ordering::SeqCst);
        assert!(commits < threads, "{commits} commits for {threads} records");
    }

    /// Runs `first` as the writer of a batch of its own; once it is
    /// writing, `others` threads queue behind it and are released.
    fn first_batch_then_others<F>(
        first: F,
        others: usize,
    ) -> (Result<(), ServiceError>, Vec<Result<(), ServiceError>>)
    where
        F: Fn() -> Result<(), StoreError> + Send + Sync + 'static,
    {
        let group = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let leader = {
            let group = group.clone();
            std::thread::spawn(move || {
                let first_call = std::sync::atomic::AtomicBool::new(true);
                group.record(record(0), |_| {
                    if first_call.swap(false, Ordering::SeqCst) {
                        started_tx.send(()).unwrap();
                        go_rx.lock().unwrap().recv().unwrap();
                    }
                    first()
                })
            })
        };

        started_rx.recv().unwrap();
        let followers: Vec<_> = (1..=others as u64)
            .map(|n| {
                let group = group.clone();
                std::thread::spawn(move || group.record(record(n), |_| Ok(())))
            })
            .collect();

        while group.state().queue.len() < others {
            std::thread::sleep(Duration::from_millis(1));
        }
        go_tx.send(()).unwrap();

        let leader = leader.join().unwrap();
        let followers = followers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            !group.state().writing,
            "the writing flag is still set after every record was written"
        );
        (leader, followers)
    }

    /// A failed commit fails its own batch only; the records queued behind
    /// it are written in the next batch.
    #[test]
    fn failure_stays_in_its_batch() {
        let (leader, followers) =
            first_batch_then_others(|| Err(StoreError::Backend("disk full".to_owned())), 7);
        assert_eq!(leader.unwrap_err().code, "internal");
        assert!(followers.iter().all(Result::is_ok), "{followers:?}");
    }

    /// A panicking commit is an error for its batch and does not leave the
    /// queued records waiting for ever.
    #[test]
    fn panic_fails_only_its_batch() {
        let (leader, followers) = first_batch_then_others(|| panic!("store bug"), 7);
        assert!(leader.is_err());
        assert!(followers.iter().all(Result::is_ok), "{followers:?}");
    }
}

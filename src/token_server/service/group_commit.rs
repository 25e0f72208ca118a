//! Group commit of issued-token records.
//!
//! Every issued token is stored durably before its response leaves, and a
//! durable SQLite commit costs one fsync, about a millisecond on common
//! disks. Issuances that arrive while a commit runs wait in a queue; when
//! that commit ends, the first of them becomes the writer and stores the
//! whole queue in one transaction. Under load many issuances share one
//! fsync; alone, an issuance commits at once, as before.
//!
//! The callers are threads of the blocking pool, so waiting blocks.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::ServiceError;
use crate::token_server::store::{AuditEvent, IssuedToken, StoreError};

/// One issued token and its audit event.
pub(super) type IssueRecord = (IssuedToken, AuditEvent);

/// What a waiting issuance is told.
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
    /// Whether some thread is writing a batch or has been told to.
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

    /// Writes every queued record in one transaction, tells the other
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
        // The conversion logs a failure once, for the whole batch.
        let outcome = write(&records).map_err(ServiceError::from);
        for (id, reply) in replies {
            if id != own_id {
                // A waiter cannot have gone: it blocks until it is told.
                let _ = reply.send(Turn::Done(outcome.clone()));
            }
        }
        let mut state = self.state();
        match state.queue.first() {
            // The next writer is woken with the lock held, so no new
            // arrival can slip in between and find nobody writing.
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

    /// A failed commit fails every record of its batch, and later records
    /// still get their own commit.
    #[test]
    fn failure_reaches_every_waiter_and_later_records_commit() {
        let group = Arc::new(GroupCommit::default());
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let threads = 8;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads as u64)
            .map(|n| {
                let (group, start, fail) = (group.clone(), start.clone(), fail.clone());
                std::thread::spawn(move || {
                    start.wait();
                    group.record(record(n), |_| {
                        std::thread::sleep(Duration::from_millis(10));
                        if fail.swap(false, Ordering::SeqCst) {
                            Err(StoreError::Backend("disk full".to_owned()))
                        } else {
                            Ok(())
                        }
                    })
                })
            })
            .collect();
        let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        assert!(failed >= 1, "the failing batch reported no error");
        assert!(failed < threads, "records after the failure also failed");
        assert!(group.record(record(99), |_| Ok(())).is_ok());
        assert!(!group.state().writing);
    }
}

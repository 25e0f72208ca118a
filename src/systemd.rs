//! Service-manager notifications (`sd_notify`) shared by `h8d` and `h8-tokend`.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, so the binaries
//! behave the same outside systemd. Send errors are logged at debug level and
//! otherwise ignored: a missing notification only delays systemd's view of
//! the service, it never stops the service itself.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::debug!(%error, "cannot send a notification to the service manager");
    }
}

/// Sends `READY=1` with `STATUS=status`, then starts the watchdog pings if
/// `WATCHDOG_USEC` is set for this process. Call it once every listener is bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    spawn_watchdog();
}

/// Sends `STATUS=status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Sends `RELOADING=1` with the `MONOTONIC_USEC` that systemd 253 and newer
/// require; follow it with [`reloaded`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => {
            tracing::debug!(%error, "cannot read the monotonic clock; not sending RELOADING=1")
        }
    }
}

/// Sends `READY=1` with `STATUS=status` after a reload, successful or not.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sends `STOPPING=1` with `STATUS=status`.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Half the watchdog timeout from `WATCHDOG_USEC`, or `None` when systemd
/// does not watch this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

/// Sends `WATCHDOG=1` at half the watchdog timeout from a task on the
/// current runtime, so a stalled runtime stops the pings and systemd
/// restarts the service.
fn spawn_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::debug!(
        interval_ms = interval.as_millis() as u64,
        "sending watchdog pings"
    );
    tokio::spawn(async move {
        loop {
            send(&[NotifyState::Watchdog]);
            tokio::time::sleep(interval).await;
        }
    });
}

//! The optional external authorizer asked per stream in side-car mode.

use super::Daemon;
use crate::token::Claims;
use crate::wire::Reject;

/// Asks the external authorizer, when one is configured, whether `caller`
/// may open `service`. Without an authorizer every stream passes here.
pub(super) async fn check(daemon: &Daemon, caller: &Claims, service: &str) -> Result<(), Reject> {
    let _ = (daemon, caller, service);
    // TODO: ask the configured authorizer over its Unix socket, with a decision cache and fallback.
    Ok(())
}

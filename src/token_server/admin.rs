//! The admin API on a Unix socket, used by `h8 admin`.
//!
//! Access control is the socket's mode, 0600: only the token server's user
//! (and root) can connect. The routes use the same JSON conventions as the
//! public API.
//!
//! | Method and path             | Request               | Response                  |
//! |-----------------------------|-----------------------|---------------------------|
//! | `POST /v1/admin/enroll`     | [`AdminEnrollRequest`]| [`api::AdminEnrollResponse`] |
//! | `POST /v1/admin/revoke`     | [`AdminRevokeRequest`]| [`api::AdminRevokeResponse`] |
//! | `POST /v1/admin/rotate-key` | none                  | [`api::AdminRotateKeyResponse`] |
//! | `POST /v1/admin/reload`     | none                  | [`api::AdminReloadResponse`] |
//! | `GET /v1/admin/audit?limit=N` | none                | [`api::AdminAuditResponse`] |
//! | `GET /v1/admin/apps`        | none                  | [`api::AdminAppsResponse`] |
//! | `GET /v1/admin/sessions`    | none                  | [`api::AdminSessionsResponse`] |

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::api::{self, AdminEnrollRequest, AdminRevokeRequest};
use super::http::{
    blocking, bounded, method_not_allowed, not_found, query_u64, serve_connection, JsonBody,
};
use super::service::{Service, ServiceError};

/// Default number of audit entries returned.
pub const DEFAULT_AUDIT_LIMIT: u64 = 50;

/// Reloads the policy on request; supplied by the process that owns the file.
pub type Reloader = Arc<dyn Fn() -> Result<usize, ServiceError> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    service: Arc<Service>,
    reload: Reloader,
}

/// Builds the admin router.
pub fn router(service: Arc<Service>, reloader: Reloader) -> Router {
    Router::new()
        .route("/v1/admin/enroll", post(enroll))
        .route("/v1/admin/revoke", post(revoke))
        .route("/v1/admin/rotate-key", post(rotate_key))
        .route("/v1/admin/reload", post(reload))
        .route("/v1/admin/audit", get(audit))
        .route("/v1/admin/apps", get(apps))
        .route("/v1/admin/sessions", get(sessions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(bounded))
        .with_state(AdminState {
            service,
            reload: reloader,
        })
}

async fn enroll(
    State(state): State<AdminState>,
    JsonBody(request): JsonBody<AdminEnrollRequest>,
) -> Result<Response, ServiceError> {
    let service = state.service;
    let response = blocking(move |now| service.create_enrollment_code(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn revoke(
    State(state): State<AdminState>,
    JsonBody(request): JsonBody<AdminRevokeRequest>,
) -> Result<Response, ServiceError> {
    let service = state.service;
    let response = blocking(move |now| service.revoke(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn rotate_key(State(state): State<AdminState>) -> Result<Response, ServiceError> {
    let service = state.service;
    let response = blocking(move |now| service.rotate_key(now)).await?;
    Ok(Json(response).into_response())
}

async fn reload(State(state): State<AdminState>) -> Result<Response, ServiceError> {
    let reload = state.reload;
    let applications = blocking(move |_| reload()).await?;
    Ok(Json(api::AdminReloadResponse { applications }).into_response())
}

async fn audit(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ServiceError> {
    let limit = query_u64(query.as_deref(), "limit")?.unwrap_or(DEFAULT_AUDIT_LIMIT);
    let service = state.service;
    let response = blocking(move |_| service.audit(limit)).await?;
    Ok(Json(response).into_response())
}

async fn apps(State(state): State<AdminState>) -> Result<Response, ServiceError> {
    Ok(Json(state.service.applications()).into_response())
}

async fn sessions(State(state): State<AdminState>) -> Result<Response, ServiceError> {
    let service = state.service;
    let response = blocking(move |now| service.sessions(now)).await?;
    Ok(Json(response).into_response())
}

/// Binds the admin socket at `path` with mode 0600.
///
/// The socket is bound inside a fresh 0700 directory next to `path`,
/// chmod-ed, then renamed into place, so it is never reachable with looser
/// permissions. A stale socket left by a crash is replaced; a socket that
/// still accepts connections means another token server runs, which fails.
pub fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| {
                format!(
                    "cannot create the admin socket directory {}",
                    parent.display()
                )
            })?;
    }
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; remove it or choose another admin_socket",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} accepts connections, so another h8-tokend is running; stop it or choose another admin_socket", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }

    let staging = staging_dir(parent)?;
    let staged = staging.join("admin.sock");
    let bound = (|| -> anyhow::Result<UnixListener> {
        let listener = UnixListener::bind(&staged)
            .with_context(|| format!("cannot bind the admin socket {}", staged.display()))?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", staged.display()))?;
        fs::rename(&staged, path)
            .with_context(|| format!("cannot move the admin socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging);
    bound
}

fn staging_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    for attempt in 0..16u32 {
        let candidate = parent.join(format!(".h8-tokend-admin.{}.{attempt}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("cannot create {}", candidate.display()))
            }
        }
    }
    bail!(
        "cannot create a staging directory for the admin socket in {}",
        parent.display()
    )
}

/// Accepts admin connections until `shutdown` turns true.
pub async fn serve_admin(
    listener: UnixListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, router.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed on the admin socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

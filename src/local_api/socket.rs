//! Unix listening sockets for the local API and the `[[forwards]]`:
//! binding, replacing stale socket files, mode and group, and systemd
//! socket activation.

use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::net::UnixListener;

use crate::config::ApiConfig;

/// Maximum length in bytes of a Unix socket path on Linux: `sun_path` holds
/// 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Mode of the sockets this daemon creates: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// A listening socket's path; the file is removed on drop unless systemd owns it.
#[derive(Debug)]
pub struct BoundSocket {
    /// Socket path.
    pub path: PathBuf,
    /// True when systemd created the socket and passed it in (`LISTEN_FDS`).
    pub from_systemd: bool,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.from_systemd {
            return;
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove the socket file");
            }
        }
    }
}

/// Returns the API listener: the socket systemd passed as fd 3, or a newly
/// bound one at `api.socket`. With socket activation no second socket is bound.
pub fn listen_api(api: &ApiConfig) -> anyhow::Result<(UnixListener, BoundSocket)> {
    if let Some(listener) = take_systemd_socket()? {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|address| address.as_pathname().map(Path::to_owned))
            .unwrap_or_else(|| api.socket.clone());
        listener
            .set_nonblocking(true)
            .context("cannot make the socket from systemd non-blocking")?;
        let listener = UnixListener::from_std(listener)
            .context("cannot register the socket from systemd with the async runtime")?;
        return Ok((
            listener,
            BoundSocket {
                path,
                from_systemd: true,
            },
        ));
    }
    bind_unix(&api.socket, api.group.as_deref())
}

/// Takes the first socket passed by systemd, when `LISTEN_PID` names this
/// process and `LISTEN_FDS` is at least 1.
fn take_systemd_socket() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let for_this_process = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_this_process || std::env::var_os("LISTEN_FDS").is_none() {
        return Ok(None);
    }
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    fds.take_unix_listener(0).context(
        "systemd passed fd 3 (LISTEN_FDS), but it is not a listening Unix stream socket; \
         set ListenStream= to a path in the .socket unit",
    )
}

/// Binds a Unix socket at `path` with mode 0660, owned by `group` when set.
/// Creates the parent directory, and replaces a socket file that no process
/// listens on (left by a crash).
pub fn bind_unix(path: &Path, group: Option<&str>) -> anyhow::Result<(UnixListener, BoundSocket)> {
    let length = path.as_os_str().as_bytes().len();
    if length > MAX_SOCKET_PATH_LEN {
        bail!(
            "socket path {} is {length} bytes long, but Unix sockets allow at most \
             {MAX_SOCKET_PATH_LEN}; choose a shorter path",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| {
            format!(
                "cannot create directory {} for socket {}",
                parent.display(),
                path.display()
            )
        })?;
    }
    remove_stale(path)?;

    // NOTE: between bind and set_permissions the socket has the mode the
    // umask gives; the parent directory's mode is what protects that window.
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind Unix socket {}", path.display()))?;
    let bound = BoundSocket {
        path: path.to_owned(),
        from_systemd: false,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    if let Some(group) = group {
        let gid = lookup_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot change the group of {} to {group:?} (gid {gid}); \
                 the daemon must run as root or be a member of that group",
                path.display()
            )
        })?;
    }
    Ok((listener, bound))
}

/// Removes `path` if it is a socket that refuses connections; fails if a
/// process listens on it or it is not a socket.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot inspect {}", path.display()))
        }
    };
    if !metadata.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; remove it or configure another socket path",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another daemon is listening on {}; stop it or configure another socket path",
            path.display()
        ),
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale socket file");
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))
        }
        Err(error) => Err(error).with_context(|| {
            format!(
                "cannot tell whether {} is in use; remove it if no daemon runs",
                path.display()
            )
        }),
    }
}

fn lookup_group(name: &str) -> anyhow::Result<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => {
            bail!("group {name:?} (api.group) does not exist; create it or remove api.group")
        }
        Err(error) => bail!("cannot look up group {name:?} (api.group): {error}"),
    }
}

//! `h8 keygen`: create a daemon identity key, or print the public key of one.
//!
//! The private key only ever goes to a new 0600 file; nothing here prints it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::daemon::lifecycle::IDENTITY_FILE;
use crate::identity::{public_key_text, IdentityKey};

/// Arguments of `h8 keygen`: exactly one of the options is required.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KeygenArgs {
    /// Write a new key to this file (mode 0600). An existing file is never
    /// replaced.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Write a new key to `identity.pem` in this h8d state directory,
    /// creating the directory (mode 0700) if it is missing.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the public key of an existing key file instead of creating one.
    #[arg(long, value_name = "PATH")]
    pub show: Option<PathBuf>,
}

/// Runs `h8 keygen`. The public key goes to standard output alone on a
/// line, so scripts can capture it; notes go to standard error.
pub fn run(args: KeygenArgs) -> ExitCode {
    match keygen(&args) {
        Ok(public_key) => {
            println!("{public_key}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.show {
        let key = IdentityKey::load(path)?;
        return Ok(public_key_text(&key.public()));
    }
    let path = match (&args.out, &args.state_dir) {
        (Some(out), _) => out.clone(),
        (None, Some(dir)) => {
            create_state_dir(dir)?;
            dir.join(IDENTITY_FILE)
        }
        (None, None) => anyhow::bail!("name the key file with --out PATH or --state-dir DIR"),
    };
    let key = IdentityKey::generate();
    key.save(&path)?;
    let public_key = public_key_text(&key.public());
    eprintln!(
        "wrote a new identity key to {} (mode 0600); pin it on each peer with\n  public_key = \"{public_key}\"",
        path.display()
    );
    Ok(public_key)
}

/// Creates `dir` with mode 0700 when it does not exist, as h8d does.
fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: Option<PathBuf>, state_dir: Option<PathBuf>, show: Option<PathBuf>) -> KeygenArgs {
        KeygenArgs {
            out,
            state_dir,
            show,
        }
    }

    #[test]
    fn keygen_writes_owner_only_key_and_show_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let public_key = keygen(&args(Some(path.clone()), None, None)).expect("keygen");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let shown = keygen(&args(None, None, Some(path))).expect("show");
        assert_eq!(shown, public_key);
    }

    #[test]
    fn keygen_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "keep me").expect("write");
        let error = keygen(&args(Some(path.clone()), None, None)).unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "keep me");
    }

    #[test]
    fn keygen_creates_state_dir_0700() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        keygen(&args(None, Some(state.clone()), None)).expect("keygen");
        let mode = std::fs::metadata(&state)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        assert!(state.join(IDENTITY_FILE).exists());
    }
}

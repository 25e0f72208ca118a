//! The systemd units in `configs/`: `systemd-analyze verify` accepts them,
//! `systemd-analyze security --offline=true` rates each service's exposure at
//! 2.9 or lower, and the example configs they point at are valid.
//!
//! The systemd checks are skipped, with a note on stderr, where
//! `systemd-analyze` is not installed (`apt-get install systemd`).

use std::path::{Path, PathBuf};
use std::process::Command;

const H8D: &str = env!("CARGO_BIN_EXE_h8d");
const TOKEND: &str = env!("CARGO_BIN_EXE_h8-tokend");

/// Highest accepted exposure rating, on systemd's scale of 0 (safe) to 10.
const MAX_EXPOSURE: f64 = 2.9;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn systemd_analyze() -> Option<PathBuf> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if found {
        Some(PathBuf::from("systemd-analyze"))
    } else {
        eprintln!("note: systemd-analyze is not installed; skipping the systemd unit checks");
        None
    }
}

/// Parses "Overall exposure level for NAME: 1.2 OK" from the security report.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level for"))?;
    let (_, rest) = line.split_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn service_exposure_at_most_limit() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    for unit in ["h8d.service", "h8-tokend.service"] {
        let output = Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(configs().join(unit))
            .output()
            .expect("run systemd-analyze security");
        let report = String::from_utf8_lossy(&output.stdout);
        let level = exposure(&report).unwrap_or_else(|| {
            panic!(
                "no exposure level for {unit} in:\n{report}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        eprintln!("{unit}: exposure {level}");
        assert!(
            level <= MAX_EXPOSURE,
            "{unit} has exposure {level}, above {MAX_EXPOSURE}:\n{report}"
        );
    }
}

#[test]
fn units_pass_systemd_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // verify checks that ExecStart= binaries exist, so the copies point at
    // the binaries this build produced instead of /usr/bin.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut units = Vec::new();
    for unit in ["h8d.socket", "h8d.service", "h8-tokend.service"] {
        let text = std::fs::read_to_string(configs().join(unit)).expect("read unit");
        let text = text
            .replace("/usr/bin/h8-tokend", TOKEND)
            .replace("/usr/bin/h8d", H8D);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).expect("write unit copy");
        units.push(path);
    }
    let output = Command::new(&analyze)
        .arg("verify")
        .args(&units)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys are only warnings for verify; treat them as errors here.
    assert!(
        !stderr.contains("Unknown key"),
        "unknown key in a unit:\n{stderr}"
    );
    assert!(
        !stderr.contains("Unknown section"),
        "unknown section in a unit:\n{stderr}"
    );
}

#[test]
fn socket_unit_path_matches_default() {
    let socket = std::fs::read_to_string(configs().join("h8d.socket")).expect("read h8d.socket");
    let listen = format!("ListenStream={}", h8::config::DEFAULT_API_SOCKET);
    assert!(
        socket.contains(&listen),
        "h8d.socket does not contain {listen}"
    );
    assert!(
        socket.contains("SocketMode=0660"),
        "h8d.socket must create the socket with mode 0660"
    );
}

#[test]
fn example_daemon_config_is_valid() {
    let output = Command::new(H8D)
        .arg("--check-config")
        .arg(configs().join("h8d.toml"))
        .output()
        .expect("run h8d --check-config");
    assert!(
        output.status.success(),
        "configs/h8d.toml is invalid: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn example_tokend_config_is_valid() {
    // The example names /etc/h8/policy.toml; point it at the example policy.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(configs().join("h8-tokend.toml")).expect("read example");
    let policy = configs().join("policy.toml");
    let text = text.replace("/etc/h8/policy.toml", &policy.display().to_string());
    let config = dir.path().join("h8-tokend.toml");
    std::fs::write(&config, text).expect("write config copy");
    let output = Command::new(TOKEND)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run h8-tokend check-config");
    assert!(
        output.status.success(),
        "configs/h8-tokend.toml or configs/policy.toml is invalid: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

//! `h8 demo --once`: the whole scenario against real `h8-tokend` and `h8d`
//! processes, each step visible in its output, and nothing left behind.

use std::process::Command;

const H8: &str = env!("CARGO_BIN_EXE_h8");

#[test]
fn demo_once_succeeds_and_cleans_up() {
    let temp = tempfile::tempdir().expect("tempdir");
    let output = Command::new(H8)
        .args(["demo", "--once"])
        .env("TMPDIR", temp.path())
        .output()
        .expect("run h8 demo --once");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "h8 demo --once failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    for step in [
        "[tokend]",
        "[enroll]",
        "[session]",
        "[token]",
        "[connect]",
        "[stream]",
        "[reject]",
    ] {
        assert!(stdout.contains(step), "no {step} step in:\n{stdout}");
    }
    assert!(
        stdout.contains("30 bytes echoed back"),
        "echo step:\n{stdout}"
    );
    assert!(
        stdout.contains("403 out_of_scope"),
        "rejection reason:\n{stdout}"
    );
    assert!(stdout.contains("source id src_"), "session step:\n{stdout}");

    let left: Vec<_> = std::fs::read_dir(temp.path())
        .expect("read temp dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "demo left files behind: {left:?}");
}

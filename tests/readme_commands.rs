//! Keeps the README honest: every command in its `sh` blocks must be one
//! that a test or `.ci/run` runs. A new command in the README fails this
//! test until it is listed here with what covers it.

const README: &str = include_str!("../README.md");
const CI: &str = include_str!("../.ci/run");

/// Command prefixes and what runs each.
const COVERED: &[(&str, &str)] = &[
    ("cargo build --release", "scripts/demo, run by .ci/run"),
    ("cargo install --locked --path .", ".ci/run"),
    ("bash scripts/demo", ".ci/run (with --once)"),
    ("bash scripts/test", ".ci/run"),
    ("bash .ci/run", "CI itself"),
    (
        "h8-tokend init",
        "tests/tokend_flow.rs and every cluster test",
    ),
    (
        "h8-tokend check-config",
        "tests/tokend_flow.rs check_config_reports_file_line_column",
    ),
    ("h8 admin enroll", "tests/tokend_flow.rs and tests/common"),
    (
        "h8d --check-config",
        "tests/systemd_units.rs example_daemon_config_is_valid",
    ),
    (
        "h8 status",
        "tests/local_api_routes.rs h8_cli_shows_status_and_errors",
    ),
    (
        "h8 connect",
        "tests/local_api_streams.rs h8_connect_moves_64_mib",
    ),
    (
        "install -m 0600 -o h8 -g h8 /dev/null",
        "tests/daemon_token_mode.rs enrollment_code_file_must_be_private",
    ),
    (
        "systemctl enable --now",
        "not run: CI has no running systemd; tests/systemd_units.rs verifies the units",
    ),
];

fn commands() -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_shell = false;
    for line in README.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_shell = trimmed == "```sh";
            continue;
        }
        if in_shell {
            let command = trimmed.split(" #").next().unwrap_or_default().trim();
            if !command.is_empty() {
                commands.push(command.to_owned());
            }
        }
    }
    commands
}

#[test]
fn readme_has_commands() {
    assert!(commands().len() >= 10, "{:?}", commands());
}

#[test]
fn every_readme_command_is_covered() {
    for command in commands() {
        let covered = COVERED
            .iter()
            .any(|(prefix, _)| command.starts_with(prefix));
        assert!(covered, "README command {command:?} is not run by any test or by .ci/run; cover it and list it here");
    }
}

#[test]
fn ci_runs_readme_test_command() {
    assert!(
        CI.contains("bash scripts/test"),
        ".ci/run must run the README's test command"
    );
    assert!(
        CI.contains("bash scripts/demo --once"),
        ".ci/run must run the demo"
    );
    assert!(
        CI.contains("cargo install --locked --path ."),
        ".ci/run must run the README's install command"
    );
}

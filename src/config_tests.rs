use super::*;

const PIN: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn token_config(extra: &str) -> String {
    format!(
        "name = \"server-a\"\nlisten = \"127.0.0.1:7401\"\nstate_dir = \"state\"\nmode = \"token-server\"\n\n[token_server]\nurl = \"https://127.0.0.1:8443\"\ntls_pin = \"{PIN}\"\napplication = \"inventory\"\n{extra}"
    )
}

fn parse(text: &str) -> Result<DaemonConfig, SourceError> {
    DaemonConfig::parse(Path::new("/etc/h8/h8d.toml"), text)
}

#[test]
fn minimal_token_server_config_parses() {
    let config = parse(&token_config("")).expect("valid");
    assert_eq!(config.name, "server-a");
    assert_eq!(config.state_dir, PathBuf::from("/etc/h8/state"));
    assert_eq!(config.api.socket, PathBuf::from(DEFAULT_API_SOCKET));
    assert!(!config.is_sidecar());
}

#[test]
fn unknown_key_names_line_and_column() {
    let err = parse(&token_config("colour = \"blue\"\n")).unwrap_err();
    assert_eq!((err.line, err.column), (10, 1), "{err}");
    assert!(err.message.contains("colour"), "{err}");
}

#[test]
fn services_peers_and_forwards_parse() {
    let text = token_config(
        "\n[[peers]]\nname = \"server-b\"\naddress = \"localhost:7402\"\n\n[services.orders]\ntarget = \"tcp:127.0.0.1:8080\"\nidentity = \"proxy-v2\"\n\n[services.inbox]\ntarget = \"accept\"\n\n[[forwards]]\nlisten = \"unix:fwd.sock\"\npeer = \"server-b\"\nservice = \"orders\"\n",
    );
    let config = parse(&text).expect("valid");
    assert_eq!(config.peers["server-b"].address, "localhost:7402");
    assert_eq!(config.services["orders"].identity, IdentityHeader::ProxyV2);
    assert_eq!(config.services["inbox"].target, Target::Accept);
    assert_eq!(
        config.forwards[0].listen,
        ListenAddress::Unix(PathBuf::from("/etc/h8/fwd.sock"))
    );
}

#[test]
fn bad_values_point_at_value() {
    let cases = [
        (
            "[[peers]]\nname = \"b\"\naddress = \"nope\"\n",
            "invalid peer address",
        ),
        ("[services.x]\ntarget = \"ftp:1\"\n", "invalid target"),
        (
            "[[forwards]]\nlisten = \"tcp:0.0.0.0:9\"\npeer = \"b\"\nservice = \"x\"\n",
            "not a loopback",
        ),
    ];
    for (extra, expected) in cases {
        let err = parse(&token_config(extra)).unwrap_err();
        assert!(err.message.contains(expected), "{extra:?}: {err}");
        assert!(err.line >= 10, "{extra:?}: {err}");
    }
}

#[test]
fn sidecar_requires_pinned_peer_keys() {
    let text = "name = \"a\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"s\"\nmode = \"side-car\"\n[sidecar]\npolicy = \"local.toml\"\n[[peers]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n";
    let err = parse(text).unwrap_err();
    assert!(err.message.contains("no public_key"), "{err}");
    assert_eq!(err.line, 8, "{err}");
}

#[test]
fn invalid_pin_is_rejected() {
    let text = token_config("").replace(PIN, "md5:abc");
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("tls_pin"), "{err}");
    assert_eq!(err.line, 8, "{err}");
}

#[test]
fn invalid_log_level_is_rejected() {
    let text = token_config("").replace("mode = ", "log_level = \"h8=[[[bogus\"\nmode = ");
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("invalid log_level"), "{err}");
    assert_eq!(err.line, 4, "{err}");
}

#[test]
fn enrollment_code_file_is_relative_to_config() {
    let config = parse(&token_config("enrollment_code_file = \"code\"\n")).expect("valid");
    let ModeConfig::TokenServer(token_server) = config.mode else {
        panic!("token-server mode expected");
    };
    assert_eq!(
        token_server.enrollment_code_file,
        Some(PathBuf::from("/etc/h8/code"))
    );
}

#[test]
fn worker_threads_defaults_to_one_and_is_bounded() {
    assert_eq!(parse(&token_config("")).expect("valid").worker_threads, 1);
    let four = token_config("").replace("mode = ", "worker_threads = 4\nmode = ");
    assert_eq!(parse(&four).expect("valid").worker_threads, 4);
    for bad in ["0", "257"] {
        let text = token_config("").replace("mode = ", &format!("worker_threads = {bad}\nmode = "));
        let err = parse(&text).unwrap_err();
        assert!(
            err.message
                .contains(&format!("worker_threads = {bad} is out of range")),
            "{err}"
        );
        assert_eq!((err.line, err.column), (4, 18), "{err}");
    }
}

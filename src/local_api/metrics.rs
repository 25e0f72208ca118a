//! `GET /metrics`: counters, session state and peer gauges in the
//! Prometheus text exposition format (version 0.0.4).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use crate::daemon::{unix_now, Daemon};

const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

const SESSION_STATES: [&str; 4] = ["starting", "active", "degraded", "down"];

pub(super) async fn metrics(State(daemon): State<Daemon>) -> impl IntoResponse {
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], render(&daemon))
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn render(daemon: &Daemon) -> String {
    let counters = &daemon.shared.metrics;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed) as f64;
    let mut out = String::new();

    metric(
        &mut out,
        "h8_handshakes_total",
        "counter",
        "Handshakes between daemons, both directions, by result.",
        &[
            ("{result=\"ok\"}".to_owned(), load(&counters.handshakes_ok)),
            (
                "{result=\"failed\"}".to_owned(),
                load(&counters.handshakes_failed),
            ),
        ],
    );
    let counter_rows = [
        (
            "h8_streams_opened_total",
            "Streams this daemon opened and a peer accepted.",
            &counters.streams_opened,
        ),
        (
            "h8_streams_accepted_total",
            "Incoming streams accepted.",
            &counters.streams_accepted,
        ),
        (
            "h8_streams_rejected_total",
            "Incoming streams rejected.",
            &counters.streams_rejected,
        ),
        (
            "h8_bytes_sent_total",
            "Bytes sent to peers on streams.",
            &counters.bytes_sent,
        ),
        (
            "h8_bytes_received_total",
            "Bytes received from peers on streams.",
            &counters.bytes_received,
        ),
    ];
    for (name, help, counter) in counter_rows {
        metric(
            &mut out,
            name,
            "counter",
            help,
            &[(String::new(), load(counter))],
        );
    }
    metric(
        &mut out,
        "h8_streams_active",
        "gauge",
        "Streams open now, both directions.",
        &[(String::new(), load(&counters.streams_active))],
    );

    metric(
        &mut out,
        "h8_quic_connections",
        "gauge",
        "QUIC connections open on the endpoint, including ones still in their handshake.",
        &[(
            String::new(),
            daemon.shared.endpoint.open_connections() as f64,
        )],
    );

    let state = daemon.session_state();
    let states: Vec<(String, f64)> = SESSION_STATES
        .iter()
        .map(|name| {
            let value = if *name == state.as_str() { 1.0 } else { 0.0 };
            (format!("{{state=\"{name}\"}}"), value)
        })
        .collect();
    metric(
        &mut out,
        "h8_session_state",
        "gauge",
        "1 for the current session state, 0 for the others.",
        &states,
    );
    if let Some(credentials) = daemon.shared.credentials.current() {
        let left = credentials.claims.expires_at.saturating_sub(unix_now());
        metric(
            &mut out,
            "h8_token_expires_in_seconds",
            "gauge",
            "Seconds until this daemon's token expires.",
            &[(String::new(), left as f64)],
        );
    }
    metric(
        &mut out,
        "h8_uptime_seconds",
        "gauge",
        "Seconds since h8d started.",
        &[(String::new(), daemon.shared.started.elapsed().as_secs_f64())],
    );

    let peers = super::routes::peer_infos(daemon);
    let mut connected = Vec::new();
    let mut open_streams = Vec::new();
    let mut rtt = Vec::new();
    for peer in &peers {
        let labels = format!("{{peer=\"{}\"}}", escape_label(&peer.name));
        connected.push((
            labels.clone(),
            if peer.state == "connected" { 1.0 } else { 0.0 },
        ));
        open_streams.push((labels.clone(), peer.open_streams as f64));
        if let Some(ms) = peer.rtt_ms {
            rtt.push((labels, ms / 1000.0));
        }
    }
    metric(
        &mut out,
        "h8_peer_connected",
        "gauge",
        "1 while a connection to the peer is up.",
        &connected,
    );
    metric(
        &mut out,
        "h8_peer_open_streams",
        "gauge",
        "Streams open on the connection to the peer.",
        &open_streams,
    );
    metric(
        &mut out,
        "h8_peer_rtt_seconds",
        "gauge",
        "Round-trip time estimate of the connection to the peer.",
        &rtt,
    );
    out
}

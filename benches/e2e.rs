//! End-to-end benchmarks of h8 with real processes on 127.0.0.1, each
//! beside a baseline measured in the same run: raw quinn, TCP loopback,
//! stunnel4 with mutual TLS, a Unix socket round trip and raw Ed25519
//! signing. docs/BENCHMARKS.md explains every figure.
//!
//! Run: `cargo bench --bench e2e -- [--quick] [--runs N] [--out PATH]`.
//! Cargo builds the release binaries the harness starts.

#![allow(missing_docs, unreachable_pub)]

#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "e2e/measure.rs"]
mod measure;
#[path = "e2e/quic.rs"]
mod quic;
#[path = "e2e/sections.rs"]
mod sections;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};

use crate::measure::median;

/// Sizes and counts of one run, smaller with `--quick`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Parameters {
    pub quick: bool,
    pub runs: usize,
    pub bulk_bytes: u64,
    pub latency_samples: usize,
    pub stunnel_samples: usize,
    pub new_connection_samples: usize,
    pub connections_per_second_total: usize,
    pub concurrency_levels: Vec<usize>,
    pub rate_seconds: f64,
    pub memory_connections: usize,
    pub memory_streams: usize,
    /// Sections to run; empty runs them all.
    pub only: Vec<String>,
}

impl Parameters {
    fn new(quick: bool, runs: usize) -> Parameters {
        if quick {
            Parameters {
                quick,
                runs,
                bulk_bytes: 32 << 20,
                latency_samples: 300,
                stunnel_samples: 100,
                new_connection_samples: 30,
                connections_per_second_total: 128,
                concurrency_levels: vec![1, 10, 100, 1000],
                rate_seconds: 0.3,
                memory_connections: 20,
                memory_streams: 200,
                only: Vec::new(),
            }
        } else {
            Parameters {
                quick,
                runs,
                bulk_bytes: 512 << 20,
                latency_samples: 3000,
                stunnel_samples: 1000,
                new_connection_samples: 300,
                connections_per_second_total: 1024,
                concurrency_levels: vec![1, 10, 100, 1000],
                rate_seconds: 3.0,
                memory_connections: 100,
                memory_streams: 1000,
                only: Vec::new(),
            }
        }
    }
}

struct Options {
    quick: bool,
    runs: usize,
    out: PathBuf,
    /// Sections to run; empty runs them all.
    only: Vec<String>,
}

/// The sections of one run, in order.
const SECTIONS: [&str; 6] = ["memory", "bulk", "open", "connect", "streams", "tokens"];

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        quick: false,
        runs: 1,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/h8-bench.json"),
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    let mut benchmarking = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--runs" => {
                let value = args.next().context("--runs needs a number")?;
                options.runs = value
                    .parse()
                    .ok()
                    .filter(|runs| *runs > 0)
                    .with_context(|| format!("--runs {value:?} is not a positive number"))?;
            }
            "--out" => options.out = args.next().context("--out needs a path")?.into(),
            "--only" => {
                let value = args.next().context("--only needs a list of sections")?;
                for section in value.split(',') {
                    ensure!(
                        SECTIONS.contains(&section),
                        "--only: unknown section {section:?}; use a comma-separated list of {}",
                        SECTIONS.join(", ")
                    );
                    options.only.push(section.to_owned());
                }
            }
            // `cargo bench` passes --bench to every bench target.
            "--bench" => benchmarking = true,
            other => bail!(
                "unknown argument {other:?}; use --quick, --runs N, --out PATH or --only SECTIONS"
            ),
        }
    }
    // `cargo test --all-targets` runs this target without --bench: a quick
    // run with the unoptimized build proves the harness works, and its
    // figures go to a separate file so they cannot be mistaken for a record.
    if !benchmarking {
        options.quick = true;
        options.out =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/h8-bench-test-mode.json");
        println!("test mode (no --bench): quick run, figures are not a measurement");
    }
    Ok(options)
}

/// One reported figure: a value from the h8 series and the baseline it is
/// compared with.
struct Row {
    name: &'static str,
    unit: &'static str,
    key: &'static str,
    baseline: &'static str,
    baseline_key: Option<&'static str>,
    /// The target on the ratio (or on the value, when there is no
    /// baseline), and whether higher is better.
    target: Option<(f64, Goal)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Goal {
    AtLeast,
    AtMost,
}

const ROWS: &[Row] = &[
    Row {
        name: "bulk throughput, one stream through h8",
        unit: "MiB/s",
        key: "bulk_h8",
        baseline: "raw quinn",
        baseline_key: Some("bulk_quinn"),
        target: Some((0.8, Goal::AtLeast)),
    },
    Row {
        name: "bulk throughput, one stream through h8",
        unit: "MiB/s",
        key: "bulk_h8",
        baseline: "stunnel4 mutual TLS",
        baseline_key: Some("bulk_stunnel"),
        target: Some((1.0, Goal::AtLeast)),
    },
    Row {
        name: "bulk throughput, one stream through h8",
        unit: "MiB/s",
        key: "bulk_h8",
        baseline: "TCP loopback",
        baseline_key: Some("bulk_tcp"),
        target: None,
    },
    Row {
        name: "bytes per CPU-second, both h8d",
        unit: "MiB/CPU-s",
        key: "cpu_h8",
        baseline: "raw quinn (harness process)",
        baseline_key: Some("cpu_quinn"),
        target: Some((0.7, Goal::AtLeast)),
    },
    Row {
        name: "bytes per CPU-second, both h8d",
        unit: "MiB/CPU-s",
        key: "cpu_h8",
        baseline: "stunnel4 (both processes)",
        baseline_key: Some("cpu_stunnel"),
        target: None,
    },
    Row {
        name: "stream open + 1-byte echo on a live connection, p50",
        unit: "us",
        key: "open_h8_p50",
        baseline: "raw quinn p50 + 2 Unix RTT + 20 us",
        baseline_key: Some("open_budget_p50"),
        target: Some((1.0, Goal::AtMost)),
    },
    Row {
        name: "stream open + 1-byte echo on a live connection, p50",
        unit: "us",
        key: "open_h8_p50",
        baseline: "raw quinn open_bi + echo, p50",
        baseline_key: Some("open_quinn_p50"),
        target: None,
    },
    Row {
        name: "stream open through the API until 101, p50",
        unit: "us",
        key: "upgrade_h8_p50",
        baseline: "",
        baseline_key: None,
        target: None,
    },
    Row {
        name: "stream open + 1-byte echo on a live connection, p99",
        unit: "us",
        key: "open_h8_p99",
        baseline: "raw quinn open_bi + echo, p99",
        baseline_key: Some("open_quinn_p99"),
        target: Some((3.0, Goal::AtMost)),
    },
    Row {
        name: "stream open + 1-byte echo on a live connection, max",
        unit: "us",
        key: "open_h8_max",
        baseline: "raw quinn open_bi + echo, max",
        baseline_key: Some("open_quinn_max"),
        target: None,
    },
    Row {
        name: "stream open + 1-byte echo on a live connection, p50",
        unit: "us",
        key: "open_h8_p50",
        baseline: "new stunnel4 connection + echo, p50",
        baseline_key: Some("stunnel_new_p50"),
        target: Some((0.25, Goal::AtMost)),
    },
    Row {
        name: "Unix socket 1-byte round trip, p50",
        unit: "us",
        key: "unix_rtt_p50",
        baseline: "",
        baseline_key: None,
        target: None,
    },
    Row {
        name: "new connection + h8 handshake + first stream, p50",
        unit: "us",
        key: "newconn_h8_p50",
        baseline: "raw quinn connect + first stream, p50",
        baseline_key: Some("newconn_quinn_p50"),
        target: Some((1.3, Goal::AtMost)),
    },
    Row {
        name: "new connection + h8 handshake + first stream, p99",
        unit: "us",
        key: "newconn_h8_p99",
        baseline: "raw quinn connect + first stream, p99",
        baseline_key: Some("newconn_quinn_p99"),
        target: None,
    },
    Row {
        name: "connections per second, 32 concurrent",
        unit: "conn/s",
        key: "cps_h8",
        baseline: "raw quinn, 32 concurrent",
        baseline_key: Some("cps_quinn"),
        target: Some((0.7, Goal::AtLeast)),
    },
    Row {
        name: "stream opens per second, 1 in flight",
        unit: "streams/s",
        key: "streams_h8_1",
        baseline: "",
        baseline_key: None,
        target: None,
    },
    Row {
        name: "stream opens per second, 10 in flight",
        unit: "streams/s",
        key: "streams_h8_10",
        baseline: "",
        baseline_key: None,
        target: None,
    },
    Row {
        name: "stream opens per second, 100 in flight",
        unit: "streams/s",
        key: "streams_h8_100",
        baseline: "raw quinn, 100 in flight",
        baseline_key: Some("streams_quinn_100"),
        target: Some((0.5, Goal::AtLeast)),
    },
    Row {
        name: "stream opens per second, 1000 in flight",
        unit: "streams/s",
        key: "streams_h8_1000",
        baseline: "h8, 10 in flight",
        baseline_key: Some("streams_h8_10"),
        target: Some((0.9, Goal::AtLeast)),
    },
    Row {
        name: "token issuance through the API, 32 clients",
        unit: "tokens/s",
        key: "tokens_api",
        baseline: "raw ed25519 sign, one core",
        baseline_key: Some("sign_one_core"),
        target: Some((0.35, Goal::AtLeast)),
    },
    Row {
        name: "tokens per CPU-second of h8-tokend",
        unit: "tokens/CPU-s",
        key: "tokens_per_cpu",
        baseline: "raw ed25519 sign, one core",
        baseline_key: Some("sign_one_core"),
        target: None,
    },
    Row {
        name: "h8d RSS per idle peer connection",
        unit: "KiB",
        key: "mem_connection",
        baseline: "",
        baseline_key: None,
        target: Some((64.0, Goal::AtMost)),
    },
    Row {
        name: "h8d RSS per open idle stream, initiator",
        unit: "KiB",
        key: "mem_stream_a",
        baseline: "",
        baseline_key: None,
        target: None,
    },
    Row {
        name: "h8d RSS per open idle stream, acceptor",
        unit: "KiB",
        key: "mem_stream_b",
        baseline: "",
        baseline_key: None,
        target: None,
    },
];

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    cluster::check_binaries()?;
    let mut parameters = Parameters::new(options.quick, options.runs);
    parameters.only = options.only;
    let machine = measure::machine();
    eprintln!(
        "h8 e2e: {} run(s){}; machine {machine}",
        options.runs,
        if options.quick { ", quick" } else { "" }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let runs = runtime.block_on(run_all(&parameters))?;
    eprintln!("finished in {:.1} s", started.elapsed().as_secs_f64());

    let report = report(&runs, &parameters, machine);
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&options.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", options.out.display()))?;
    eprintln!("wrote {}", options.out.display());
    Ok(())
}

async fn run_all(parameters: &Parameters) -> anyhow::Result<Vec<BTreeMap<String, f64>>> {
    let mut cluster = cluster::Cluster::start().await?;
    let raw = quic::RawQuinn::start().await?;
    let tokens = sections::TokenClients::enroll(&cluster).await?;
    let mut runs = Vec::new();
    for run in 0..parameters.runs {
        eprintln!("run {} of {}", run + 1, parameters.runs);
        let mut values = BTreeMap::new();
        // Fresh daemons: the memory readings must not reuse memory that an
        // earlier run freed.
        cluster.restart_daemons().await?;
        let runs_section =
            |name: &str| parameters.only.is_empty() || parameters.only.iter().any(|s| s == name);
        if runs_section("memory") {
            sections::memory(&cluster, parameters, &mut values).await?;
        }
        if runs_section("bulk") {
            sections::bulk(&cluster, &raw, parameters, &mut values).await?;
        }
        if runs_section("open") {
            sections::open_latency(&cluster, &raw, parameters, &mut values).await?;
        }
        if runs_section("connect") {
            sections::new_connections(&cluster, &raw, parameters, &mut values).await?;
        }
        if runs_section("streams") {
            sections::stream_rates(&cluster, &raw, parameters, &mut values).await?;
        }
        if runs_section("tokens") {
            sections::token_issuance(&tokens, parameters, &mut values).await?;
        }
        cluster.check_running()?;
        for (key, value) in &values {
            eprintln!("  {key} = {value:.1}");
        }
        runs.push(values);
    }
    Ok(runs)
}

fn report(
    runs: &[BTreeMap<String, f64>],
    parameters: &Parameters,
    machine: serde_json::Value,
) -> serde_json::Value {
    let series = |key: &str| -> Vec<f64> {
        runs.iter()
            .map(|run| run.get(key).copied().unwrap_or(f64::NAN))
            .collect()
    };
    let mut rows = Vec::new();
    println!(
        "\n{:<54} {:>11} {:<10} {:<38} {:>11} {:>7}  target",
        "figure (median of runs)", "value", "unit", "baseline", "baseline", "ratio"
    );
    for row in ROWS {
        let value = median(&series(row.key));
        let (baseline_value, ratio) = match row.baseline_key {
            Some(key) => {
                // The ratio is the median of the per-run ratios, so each
                // value is compared with the baseline measured next to it.
                let ratios: Vec<f64> = series(row.key)
                    .iter()
                    .zip(series(key))
                    .map(|(value, baseline)| value / baseline)
                    .collect();
                (Some(median(&series(key))), Some(median(&ratios)))
            }
            None => (None, None),
        };
        let verdict = row.target.map(|(limit, goal)| {
            let checked = ratio.unwrap_or(value);
            let met = match goal {
                Goal::AtLeast => checked >= limit,
                Goal::AtMost => checked <= limit,
            };
            let sign = if goal == Goal::AtLeast { ">=" } else { "<=" };
            let what = if ratio.is_some() { "ratio" } else { "value" };
            (format!("{what} {sign} {limit}"), met)
        });
        println!(
            "{:<54} {:>11.1} {:<10} {:<38} {:>11} {:>7}  {}",
            row.name,
            value,
            row.unit,
            row.baseline,
            baseline_value.map_or(String::new(), |v| format!("{v:.1}")),
            ratio.map_or(String::new(), |r| format!("{r:.3}")),
            verdict
                .as_ref()
                .map_or(String::new(), |(text, met)| format!(
                    "{text}: {}",
                    if *met { "met" } else { "missed" }
                )),
        );
        rows.push(serde_json::json!({
            "name": row.name,
            "key": row.key,
            "value": value,
            "unit": row.unit,
            "baseline": row.baseline,
            "baseline_key": row.baseline_key,
            "baseline_value": baseline_value,
            "ratio": ratio,
            "target": verdict.as_ref().map(|(text, _)| text.clone()),
            "target_met": verdict.as_ref().map(|(_, met)| *met),
        }));
    }
    serde_json::json!({
        "date": measure::command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "machine": machine,
        "load_average_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "parameters": parameters,
        "results": rows,
        "runs": runs,
    })
}

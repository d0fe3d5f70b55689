#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `bench` binary end to end, on loads small enough for CI: the
//! workload runner's report, JSON and chart, and the disk baseline. These
//! check what the runner produces (a complete report, a clean read-back, a
//! chart), not how fast anything is.

use std::path::Path;
use std::process::{Command, Output};

/// A load small enough for a test: two vbuckets of 2,000 keys for 2 s.
const SMALL_LOAD: &[&str] = &[
    "--seconds",
    "2",
    "--vbuckets",
    "2",
    "--keys",
    "2000",
    "--rate",
    "20000",
    "--read-rate",
    "2000",
    "--min-file-size",
    "65536",
];

fn bench(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .output()
        .expect("the bench binary runs");
    assert!(
        output.status.success(),
        "bench {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn a_short_compare_run_reads_everything_back_and_writes_its_json_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg, data) = (
        path(dir.path(), "report.json"),
        path(dir.path(), "chart.svg"),
        path(dir.path(), "data"),
    );
    let output = bench(
        &[
            &["--compare"][..],
            SMALL_LOAD,
            &["--dir", &data, "--out", &json, "--chart", &svg],
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for section in [
        "==== concurrent compaction ====",
        "==== blocking compaction ====",
        "==== side by side (blocking / concurrent) ====",
        "compaction running: p99",
        "no compaction running: p99",
        "commit lock held p99",
        "steady-state average",
        "the same, in the steady state",
        "all 4000 keys read back as persisted: none differ",
    ] {
        assert!(stdout.contains(section), "no {section:?} in:\n{stdout}");
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let check = &run["figures"]["final check (close, reopen, read back)"];
        assert_eq!(check["keys checked"], 4000.0);
        assert_eq!(check["keys that differ"], 0.0);
        assert!(!run["sizes"].as_array().unwrap().is_empty());
    }

    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg"),
        "not an SVG: {}",
        &chart[..80.min(chart.len())]
    );
    assert!(chart.contains("flush-batch commit latency"));
    assert!(chart.contains("file size and live data (blocking compaction)"));
}

#[test]
fn the_disk_baseline_reports_a_rate_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let output = bench(&["disk", "--bytes", "1048576", "--dir", &path(dir.path(), "")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("MiB/s"), "{stdout}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_non_empty_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("something"), b"x").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--seconds",
            "1",
            "--no-chart",
            "--dir",
            &path(dir.path(), ""),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not empty"));
}

#[test]
fn a_small_peers_run_reads_every_value_back_with_and_without_the_node_cache() {
    let dir = tempfile::tempdir().unwrap();
    let json = path(dir.path(), "peers.json");
    let output = bench(&[
        "peers",
        "--keys",
        "3000",
        "--batch",
        "100",
        "--engines",
        "ours-uncached",
        "--no-disk-baseline",
        "--dir",
        &path(dir.path(), "data"),
        "--out",
        &json,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    for engine in ["ours", "ours-uncached"] {
        assert!(
            stdout.contains(&format!("{engine}: reopen")),
            "no read-back line for {engine}:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("read-back of 3000 keys").count(),
        2,
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let engines = report["engines"].as_array().expect("an engines array");
    let names: Vec<&str> = engines.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["ours", "ours-uncached"]);
    for engine in engines {
        assert_eq!(engine["mismatches"], 0, "{engine}");
    }
}

#[test]
fn a_short_history_run_reports_the_cost_of_history_and_reads_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let (json, data) = (path(dir.path(), "report.json"), path(dir.path(), "data"));
    let output = bench(
        &[
            &[
                "--history",
                "--history-age",
                "10s",
                "--history-granularity",
                "200ms",
            ][..],
            SMALL_LOAD,
            &["--dir", &data, "--out", &json, "--no-chart"],
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for section in [
        "==== concurrent compaction ====",
        "==== concurrent+history compaction ====",
        "==== side by side (concurrent+history / concurrent) ====",
        "==== the cost of history ====",
        "space: file size at the end",
        "compaction time:",
        "history headers kept per compaction",
        "all 4000 keys read back as persisted: none differ",
    ] {
        assert!(stdout.contains(section), "no {section:?} in:\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs[0]["history"].is_null());
    assert_eq!(runs[1]["history"]["granularity_s"], 0.2);
    for run in runs {
        let check = &run["figures"]["final check (close, reopen, read back)"];
        assert_eq!(check["keys that differ"], 0.0);
    }
}

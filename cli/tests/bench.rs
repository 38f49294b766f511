//! `faasmoe bench` end to end on the tiny fixture: every mode runs for real (2 tenants, so
//! shared-baseline, faasmoe-private and local-baseline are their own deployments), and runs.csv has numbers
//! for each. Needs nats-server and the sibling binaries:
//! `cargo build -p faasmoe-broker -p faasmoe-expert-worker`.

use std::path::PathBuf;
use std::process::Command;

const MODES: [&str; 6] = [
    "baseline",
    "shared-baseline",
    "faasmoe-shared",
    "faasmoe-private",
    "local-split",
    "local-baseline",
];

#[test]
fn bench_runs_every_mode_on_the_tiny_fixture() {
    let Some(tiny) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED bench test: fixture qwen15-moe-tiny not found");
        return;
    };
    if let Err(e) = faasmoe_broker::server::nats_server_bin() {
        eprintln!("!!! SKIPPED bench test: no nats-server ({e}); run scripts/install-nats-server");
        return;
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_faasmoe"));
    for sib in ["faasmoe-broker", "faasmoe-expert-worker"] {
        assert!(
            exe.with_file_name(sib).exists(),
            "{sib} is missing next to {}: cargo build -p faasmoe-broker -p faasmoe-expert-worker",
            exe.display()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(&exe)
        .args(["bench", "--model"])
        .arg(&tiny)
        .arg("--expert-model")
        .arg(&tiny)
        .args([
            "--tenants",
            "2",
            "--granularities",
            "16",
            // Enough work that every mode's cold phase takes several 10 ms CPU clock ticks
            // (with 1 request of 4 tokens per tenant a tiny-model run could measure 0).
            "--requests",
            "2",
            "--max-prompt",
            "8",
            "--max-output",
            "8",
            "--time-mul",
            "0.01",
        ])
        .args([
            "--cold-start-repeats",
            "2",
            "--tail-s",
            "0",
            "--sample-ms",
            "200",
            "--sweep",
            "1,2",
            "--sweep-requests",
            "1",
            "--warm-requests",
            "3",
            "--out",
        ])
        .arg(out.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let mut rdr = csv::Reader::from_path(out.path().join("runs.csv")).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    for mode in MODES {
        let r = rows
            .iter()
            .find(|r| &r[col("mode")] == mode)
            .unwrap_or_else(|| panic!("no row for {mode}\n{stdout}"));
        assert_eq!(&r[col("skipped")], "", "{mode} skipped\n{stdout}");
        assert_eq!(&r[col("errors")], "0", "{mode} had errors\n{stdout}");
        for c in [
            "completion_tokens",
            "pss_mean_mb",
            "rss_peak_mb",
            "cpu_percent",
            "ttft_p50_ms",
            "tpot_p50_ms",
            "tok_per_s",
            "mem_ratio_vs_baseline",
            "mem_ratio_vs_local_baseline",
            "cpu_ratio_vs_local_baseline",
        ] {
            let v: f64 = r[col(c)].parse().unwrap_or_else(|_| {
                panic!("{mode}: {c} = {:?} is not a number\n{stdout}", &r[col(c)])
            });
            assert!(v > 0.0, "{mode}: {c} = {v}");
        }
        let warm: usize = r[col("warm_requests")].parse().unwrap();
        if mode.starts_with("faasmoe") {
            let inv: f64 = r[col("invocations_per_token")].parse().unwrap();
            assert!(inv > 0.0, "{mode}: no function invocations");
            // Every request started with no function running: each saw cold starts.
            assert_eq!(warm, 0, "{mode}: requests counted as warm\n{stdout}");
        } else {
            // Without functions every request is warm.
            assert_eq!(warm.to_string(), r[col("ok")].to_string(), "{mode}");
            assert_eq!(
                &r[col("warm_tpot_p50_ms")],
                &r[col("tpot_p50_ms")],
                "{mode}"
            );
        }
    }
    // phases.csv: every mode has a cold and a warm phase and the two sweep points, each
    // with measured figures (no empty cell where a measurement was possible).
    let mut rdr = csv::Reader::from_path(out.path().join("phases.csv")).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let pcol = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in phases.csv"))
    };
    let phases: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    for mode in MODES {
        for phase in ["cold", "warm", "sweep-c1", "sweep-c2"] {
            let r = phases
                .iter()
                .find(|r| &r[pcol("mode")] == mode && &r[pcol("phase")] == phase)
                .unwrap_or_else(|| panic!("no {phase} phase for {mode}\n{stdout}"));
            assert_eq!(&r[pcol("errors")], "0", "{mode} {phase}\n{stdout}");
            for c in [
                "completion_tokens",
                "wall_s",
                "tok_per_s",
                "ttft_p50_ms",
                "tpot_p50_ms",
                "tpot_p99_ms",
                "cpu_s_per_token",
                "pss_mean_mb",
            ] {
                let v: f64 = r[pcol(c)].parse().unwrap_or_else(|_| {
                    panic!(
                        "{mode} {phase}: {c} = {:?} is not a number\n{stdout}",
                        &r[pcol(c)]
                    )
                });
                assert!(v > 0.0, "{mode} {phase}: {c} = {v}");
            }
            if phase == "warm" {
                // --warm-requests 3 for each of the 2 tenants: a longer slice than the
                // cold phase's 2 requests per tenant.
                assert_eq!(&r[pcol("requests")], "6", "{mode} warm\n{stdout}");
                // Primed: the warm phase runs (at least partly) on started functions.
                let warm: usize = r[pcol("warm_requests")].parse().unwrap();
                assert!(
                    warm > 0,
                    "{mode}: no warm request in the warm phase\n{stdout}"
                );
            }
        }
    }
    let experts = std::fs::read_to_string(out.path().join("experts.csv")).unwrap();
    assert!(experts.lines().count() >= 3, "{experts}");
    // Controller memory: a real controller idle with remote and local experts, and during one
    // request; every figure measured, the KV cache counted only with a live sequence.
    let mut rdr = csv::Reader::from_path(out.path().join("controller.csv")).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let ccol = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in controller.csv"))
    };
    let ctl: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(
        ctl.len(),
        3,
        "controller.csv rows
{stdout}"
    );
    let num = |r: &csv::StringRecord, c: &str| -> f64 { r[ccol(c)].parse().unwrap() };
    for r in &ctl {
        for c in [
            "weight_mb",
            "rss_mb",
            "rss_ratio",
            "high_water_mb",
            "ready_ms",
        ] {
            assert!(
                num(r, c) > 0.0,
                "{}: {c}
{stdout}",
                &r[ccol("state")]
            );
        }
        // Resident memory holds at least the tensors it reports.
        assert!(num(r, "rss_ratio") > 0.9, "{}", &r[ccol("state")]);
    }
    assert!(ctl[0][ccol("state")].starts_with("remote experts, idle"));
    assert!(ctl[1][ccol("state")].starts_with("local experts, idle"));
    assert!(ctl[2][ccol("state")].starts_with("local experts, 1 request"));
    // Local experts hold every tensor: more than the control plane alone.
    assert!(num(&ctl[1], "weight_mb") > num(&ctl[0], "weight_mb"));
    assert_eq!(num(&ctl[0], "kv_mb"), 0.0);
    assert!(num(&ctl[2], "kv_mb") > 0.0);
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("## Controller memory"), "{report}");
    assert!(report.contains("| faasmoe-private |"), "{report}");
    assert!(report.contains("| local-baseline |"), "{report}");
    assert!(report.contains("## Cold and warm phases"), "{report}");
    assert!(report.contains("throughput stops growing at"), "{report}");
    for png in [
        "memory_over_time.png",
        "latency_cdf.png",
        "granularity.png",
        "capacity.png",
        "phases.png",
    ] {
        assert!(out.path().join(png).exists(), "{png} missing; {stdout}");
    }
}

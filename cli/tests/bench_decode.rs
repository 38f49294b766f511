//! `faasmoe bench --decode-only` on the tiny fixture: the decode-scaling section runs (batch
//! sweep, context sweep, bandwidth and compute floors) for local-split (in-process) and
//! faasmoe-shared (a real nats-server, broker and expert workers, started by the bench), and
//! decode.csv holds a positive number in every column of every point of both modes.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn decode_section_runs_on_the_tiny_fixture_and_writes_decode_csv() {
    let Some(tiny) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED decode bench test: fixture qwen15-moe-tiny not found");
        return;
    };
    if let Err(e) = faasmoe_broker::server::nats_server_bin() {
        eprintln!(
            "!!! SKIPPED decode bench test (its faasmoe-shared points need nats-server): {e}"
        );
        return;
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_faasmoe"));
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(&exe)
        .args(["bench", "--decode-only", "--decode-model"])
        .arg(&tiny)
        .args([
            "--decode-batches",
            "1,2,4",
            "--decode-contexts",
            "8,40",
            "--decode-reps",
            "2",
            "--bandwidth-mib",
            "16",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("TPOT at context 40 ÷ at 8"), "{stdout}");
    assert!(stdout.contains("faasmoe-shared ÷ local-split"), "{stdout}");
    // faasmoe-shared went through real expert workers started by the broker.
    let workers = out.path().join("decode-logs").join("workers");
    let logs = std::fs::read_dir(&workers)
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("{}: {e}\n{stdout}", workers.display()));
    assert!(logs > 0, "no worker log in {}\n{stdout}", workers.display());
    let csv = std::fs::read_to_string(out.path().join("decode.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[0], "mode", "{csv}");
    let header = &header[1..];
    // Per mode, the numeric columns after `mode`.
    let mut by_mode: std::collections::BTreeMap<String, Vec<Vec<f64>>> = Default::default();
    for l in lines {
        let (mode, rest) = l.split_once(',').unwrap();
        by_mode
            .entry(mode.to_string())
            .or_default()
            .push(rest.split(',').map(|v| v.parse().unwrap()).collect());
    }
    assert_eq!(
        by_mode.keys().collect::<Vec<_>>(),
        vec!["faasmoe-shared", "local-split"],
        "{csv}"
    );
    for rows in by_mode.values() {
        check_mode(header, rows, &csv);
    }
    // The baseline ran at each batch size of the sweep, next to local-split.
    let base = std::fs::read_to_string(out.path().join("decode_baseline.csv")).unwrap();
    let batches: Vec<f64> = base
        .lines()
        .skip(1)
        .map(|l| {
            let v: Vec<f64> = l.split(',').map(|x| x.parse().unwrap()).collect();
            assert!(v.iter().all(|x| *x > 0.0), "{base}");
            v[1]
        })
        .collect();
    assert_eq!(batches, vec![1.0, 2.0, 4.0], "{base}");
}

/// The points of one mode: every column positive, the planned points in order, identical
/// prompts touching the same experts, distinct ones at least as many.
fn check_mode(header: &[&str], rows: &[Vec<f64>], csv: &str) {
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name}: {csv}"))
    };
    let distinct = col("distinct_prompts");
    // The compute floor is a lower bound of the step.
    let (compute, step) = (col("compute_floor_ms"), col("step_ms"));
    col("step_over_max_floor");
    for r in rows {
        assert!(r[compute] <= r[step], "compute floor above the step: {csv}");
    }
    let (experts, bytes) = (col("experts_touched"), col("bytes"));
    assert_eq!(distinct, header.len() - 1, "{csv}");
    let points: Vec<(f64, f64, f64)> = rows.iter().map(|r| (r[0], r[1], r[distinct])).collect();
    assert_eq!(
        points,
        vec![
            (8.0, 1.0, 0.0),
            (8.0, 2.0, 0.0),
            (8.0, 4.0, 0.0),
            (8.0, 2.0, 1.0),
            (8.0, 4.0, 1.0),
            (40.0, 1.0, 0.0)
        ],
        "{csv}"
    );
    for r in rows {
        assert_eq!(r.len(), header.len(), "{csv}");
        for (h, v) in header.iter().zip(r).take(distinct) {
            assert!(*v > 0.0, "{h} = {v}\n{csv}");
        }
    }
    // Identical prompts route every row to the same experts; distinct ones touch at least
    // as many, and their floor counts them.
    let same: Vec<&Vec<f64>> = rows.iter().filter(|r| r[distinct] == 0.0).collect();
    assert!(same.iter().all(|r| r[experts] == same[0][experts]), "{csv}");
    for d in rows.iter().filter(|r| r[distinct] == 1.0) {
        let s = same.iter().find(|s| s[0] == d[0] && s[1] == d[1]).unwrap();
        assert!(
            d[experts] >= s[experts] && d[bytes] >= s[bytes],
            "distinct prompts touch more: {csv}"
        );
    }
}

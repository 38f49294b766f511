//! `faasmoe model`: the checkpoint tools, run as a user runs them.

use std::process::Command;

use faasmoe_model::random_checkpoint::{preset, write_checkpoint_filled, Fill};

/// Resident memory of an expert function is proportional to the experts it holds, measured
/// on the real Qwen1.5-MoE-A2.7B layer geometry (hidden 2048, 60 experts × 1408), one
/// process per measurement.
#[test]
fn expert_function_memory_is_proportional_to_its_experts_on_the_a27b_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = preset("qwen1.5-moe-a2.7b").unwrap();
    g.num_hidden_layers = 1;
    g.vocab_size = 1024;
    // Zero weights as file holes: the real sizes without 1.15 GB of disk (CI disks are small).
    write_checkpoint_filled(tmp.path(), &g, Fill::Zeros, 1, u64::MAX, |_, _| {}).unwrap();
    let rss = |experts: &str| -> (f64, f64) {
        let out = Command::new(env!("CARGO_BIN_EXE_faasmoe"))
            .args(["model", "expert-rss", "--model"])
            .arg(tmp.path())
            .args(["--layer", "0", "--experts", experts])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            j["rss_after_bytes"].as_f64().unwrap(),
            j["weight_bytes"].as_f64().unwrap(),
        )
    };
    let (one, w1) = rss("0..1");
    let (all, w60) = rss("0..60");
    eprintln!("RSS 1 expert: {:.1} MB (weights {:.1} MB); 60 experts: {:.1} MB (weights {:.1} MB); checkpoint {:.1} MB",
        one / 1e6, w1 / 1e6, all / 1e6, w60 / 1e6, g.total_bytes() as f64 / 1e6);
    // Weights stay in the checkpoint's bf16: 3 × 2048 × 1408 × 2 bytes = 17.3 MB per expert.
    assert_eq!(w1, 3.0 * 2048.0 * 1408.0 * 2.0);
    assert!(one < w1 + 40e6, "one expert's process holds {one} bytes");
    // The 59 extra experts cost 59 experts' weights (±5%), nothing more; per expert at most
    // 1.1 × its 17.3 MB of bf16 tensors (issue 15).
    let extra = all - one;
    eprintln!("RSS per extra expert: {:.2} MB", extra / 59.0 / 1e6);
    assert!(
        (extra / (59.0 * w1) - 1.0).abs() < 0.05,
        "60 experts {all} vs 1 expert {one}"
    );
    assert!(
        extra / 59.0 <= 1.1 * w1,
        "{} bytes per expert",
        extra / 59.0
    );
    assert!(
        all < w60 * 1.05 + 40e6,
        "60 experts hold {all} for {w60} of weights"
    );
}

//! [`BenchArgs`]: the settings of `faasmoe bench` (its `--help`).

use std::path::PathBuf;

use crate::workload::ScaleArgs;

/// Settings of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Checkpoint for the mode comparison; default: demo-data/qwen15-moe-demo (generated if absent).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Checkpoint for the per-expert memory and cold-start measurement; default:
    /// demo-data/qwen15-moe-a2.7b-l1-v1024 (the exact Qwen1.5-MoE-A2.7B layer geometry, 1 layer,
    /// vocab 1024, random weights; generated if absent).
    #[arg(long)]
    pub expert_model: Option<PathBuf>,
    /// Skip the per-expert measurement.
    #[arg(long)]
    pub no_expert_bench: bool,
    /// Run only the decode-scaling section (per-layer decode step vs batch and context, for
    /// local-split and faasmoe-shared, next to the memory and compute floors) and write
    /// decode.csv. faasmoe-shared needs nats-server; without it (or with
    /// --decode-local-only) only local-split is measured.
    #[arg(long)]
    pub decode_only: bool,
    /// Skip the decode-scaling section.
    #[arg(long)]
    pub no_decode_bench: bool,
    /// Checkpoint of the decode-scaling section (default: the expert model).
    #[arg(long)]
    pub decode_model: Option<PathBuf>,
    /// Batch sizes of the decode-scaling section.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub decode_batches: Vec<usize>,
    /// Context lengths (tokens cached) of the decode-scaling section: the batch sweep at the
    /// first, batch 1 at each.
    #[arg(long, value_delimiter = ',', default_value = "16,4096")]
    pub decode_contexts: Vec<usize>,
    /// Timed decode steps per point (median reported).
    #[arg(long, default_value_t = 10)]
    pub decode_reps: usize,
    /// Experts per function of the decode section's faasmoe-shared points (a real
    /// nats-server, broker and expert workers; 60 = one function per layer of A2.7B).
    #[arg(long, default_value_t = 60)]
    pub decode_granularity: u32,
    /// Measure only local-split in the decode section (no nats-server, broker or workers).
    #[arg(long)]
    pub decode_local_only: bool,
    /// Buffer of the read-bandwidth measurement, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Qwen's BPE ranks (for generating the demo checkpoint's tokenizer).
    #[arg(long, default_value = ".tools/qwen.tiktoken")]
    pub tiktoken: PathBuf,
    /// Tenant counts.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Option<Vec<usize>>,
    /// Granularities (experts per function) of the faasmoe-shared sweep (at the largest tenant count).
    #[arg(long, value_delimiter = ',')]
    pub granularities: Option<Vec<u32>>,
    /// Granularity of faasmoe-shared/-private in the mode comparison (default: 20 if swept, else the largest swept).
    #[arg(long)]
    pub granularity: Option<u32>,
    /// Modes to run (baseline, shared-baseline, faasmoe-shared, faasmoe-private, local-split,
    /// local-baseline).
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<String>>,
    /// Requests per tenant.
    #[arg(long)]
    pub requests: Option<usize>,
    /// How the trace is shrunk.
    #[command(flatten)]
    pub scale: ScaleArgs,
    /// Largest prompt (tokens) after scaling.
    #[arg(long)]
    pub max_prompt: Option<u32>,
    /// Largest output (tokens) after scaling.
    #[arg(long)]
    pub max_output: Option<u32>,
    /// Expert workers exit after this many ms idle.
    #[arg(long, default_value_t = 10_000)]
    pub idle_timeout_ms: u64,
    /// Most instances per function.
    #[arg(long, default_value_t = 2)]
    pub max_instances: u32,
    /// Seconds to keep sampling after the workload (to see scale to zero); default: idle timeout + 2 s, 0 with --quick.
    #[arg(long)]
    pub tail_s: Option<f64>,
    /// Sampling interval, ms.
    #[arg(long, default_value_t = 500)]
    pub sample_ms: u64,
    /// Spawn → READY repeats per expert set.
    #[arg(long)]
    pub cold_start_repeats: Option<usize>,
    /// A subset that finishes in about 6 minutes on 2 cores: tenants 1,3; granularities 4,10,60;
    /// 2 requests per tenant in the cold phase, 12 in the warm one; prompts ≤ 32, outputs ≤ 8
    /// tokens; sweep 1,2,4,8 with 2 requests per client; 5 cold-start repeats.
    #[arg(long)]
    pub quick: bool,
    /// Skip the warm phase (the workload replayed once the functions it needs are started).
    #[arg(long)]
    pub no_warm: bool,
    /// Requests per tenant of the warm phase: the same trace slice as the cold phase, longer,
    /// so that its p50s rest on enough samples to repeat between runs (default 12 with
    /// --quick, else 16).
    #[arg(long)]
    pub warm_requests: Option<usize>,
    /// Concurrencies of the closed-loop capacity sweep (run for every mode at the largest
    /// tenant count); default 1,2,4,8 with --quick, else 1,2,4,8,16,32.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<usize>>,
    /// Skip the capacity sweep.
    #[arg(long)]
    pub no_sweep: bool,
    /// Requests each client of the sweep sends, one after another (default 2 with --quick, else 4).
    #[arg(long)]
    pub sweep_requests: Option<usize>,
    /// Results folder (default: results/bench-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl BenchArgs {
    /// Requests per tenant of the warm phase: `--warm-requests`, else 12 with `--quick` and 16
    /// without; at least 1.
    pub fn warm_requests_per_tenant(&self) -> usize {
        self.warm_requests
            .unwrap_or(if self.quick { 12 } else { 16 })
            .max(1)
    }
}

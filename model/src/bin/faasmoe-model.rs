//! `faasmoe-model`: checkpoint tools — generate random-weight checkpoints in the hub layout,
//! and measure the resident memory of an expert function.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Parser, Subcommand};
use faasmoe_model::experts::{ExpertId, ExpertSelection};
use faasmoe_model::generator::{self, DEFAULT_MAX_SHARD_BYTES, PRESETS};
use faasmoe_model::{Checkpoint, ExpertSet};

#[derive(Parser)]
#[command(name = "faasmoe-model", version, about = "Qwen2-MoE checkpoint tools for faasmoe")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a random-weight checkpoint in the exact Hugging Face hub layout (bf16, sharded).
    Init(InitArgs),
    /// Load only the given experts of a checkpoint and print the process's resident memory
    /// (JSON: rss_bytes before and after loading, weight bytes).
    ExpertRss {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// MoE layer index.
        #[arg(long)]
        layer: usize,
        /// Experts as a range `A..B` (end exclusive) or a list `1,5,9`.
        #[arg(long)]
        experts: String,
    },
}

/// Arguments of `init` (also used by the `faasmoe model init` command).
#[derive(clap::Args)]
struct InitArgs {
    /// Output directory (created if absent).
    #[arg(long)]
    out: PathBuf,
    /// Geometry preset: qwen1.5-moe-a2.7b (real sizes), demo (4× narrower), tiny.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Keep only this many decoder layers (the full qwen1.5-moe-a2.7b does not fit 24 GiB).
    #[arg(long)]
    layers: Option<usize>,
    /// Override the vocabulary size.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard in bytes (Hugging Face's default 2 GB).
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Copy this tokenizer.json into the checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

fn parse_experts(s: &str) -> anyhow::Result<Vec<usize>> {
    if let Some((a, b)) = s.split_once("..") {
        Ok((a.trim().parse()?..b.trim().parse()?).collect())
    } else {
        s.split(',').map(|x| Ok(x.trim().parse()?)).collect()
    }
}

fn rss_bytes() -> anyhow::Result<u64> {
    let me = procfs::process::Process::myself()?;
    Ok(me.status()?.vmrss.context("no VmRSS")? * 1024)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init(a) => {
            let Some(mut g) = generator::preset(&a.preset) else {
                bail!("unknown preset `{}` (known: {})", a.preset, PRESETS.join(", "));
            };
            if let Some(l) = a.layers {
                g.num_hidden_layers = l;
            }
            if let Some(v) = a.vocab_size {
                g.vocab_size = v;
            }
            let total = g.total_bytes();
            eprintln!(
                "writing {} ({} layers, hidden {}, {} experts × {}, {:.2} GB bf16) to {}",
                a.preset, g.num_hidden_layers, g.hidden_size, g.num_experts, g.moe_intermediate_size,
                total as f64 / 1e9, a.out.display()
            );
            let bar = indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")?,
            );
            let w = generator::write_checkpoint(&a.out, &g, a.seed, a.max_shard_bytes, |d, _| bar.set_position(d))?;
            bar.finish_and_clear();
            if let Some(t) = a.tokenizer {
                std::fs::copy(&t, a.out.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
            }
            eprintln!("wrote {} tensors in {} file(s): {}", w.tensors, w.files.len(), w.files.join(", "));
        }
        Cmd::ExpertRss { model, layer, experts } => {
            let before = rss_bytes()?;
            let mut ckpt = Checkpoint::open(&model, DType::F32)?;
            let sel = ExpertSelection(parse_experts(&experts)?.into_iter().map(|expert| ExpertId { layer, expert }).collect());
            let set = ExpertSet::load(&mut ckpt, &sel)?;
            drop(ckpt);
            let after = rss_bytes()?;
            println!(
                "{}",
                serde_json::json!({"experts": sel.0.len(), "rss_before_bytes": before, "rss_after_bytes": after, "weight_bytes": set.weight_bytes()})
            );
        }
    }
    Ok(())
}

//! `faasmoe-model`: checkpoint tools — generate random-weight checkpoints in the hub layout,
//! and measure the resident memory of an expert function.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::{Parser, Subcommand};
use faasmoe_model::experts::{ExpertId, ExpertSelection};
use faasmoe_model::generator::{init, InitArgs};
use faasmoe_model::{Checkpoint, ExpertSet};

#[derive(Parser)]
#[command(
    name = "faasmoe-model",
    version,
    about = "Qwen2-MoE checkpoint tools for faasmoe"
)]
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
            init(&a)?;
        }
        Cmd::ExpertRss {
            model,
            layer,
            experts,
        } => {
            let before = rss_bytes()?;
            let mut ckpt = Checkpoint::open(&model, DType::F32)?;
            let sel = ExpertSelection(
                parse_experts(&experts)?
                    .into_iter()
                    .map(|expert| ExpertId { layer, expert })
                    .collect(),
            );
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

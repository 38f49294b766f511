//! Random-weight checkpoints in the exact Hugging Face hub layout of Qwen1.5-MoE-A2.7B:
//! hub tensor names, a hub-form `config.json`, bf16 storage, shards of at most
//! [`DEFAULT_MAX_SHARD_BYTES`] with `model.safetensors.index.json`. Seeded: the same seed and
//! geometry give the same bytes, tensor by tensor, whatever the shard size.
//!
//! Weights are uniform with the standard deviation of transformers' `initializer_range`
//! (0.02); norms are 1. Files are streamed to disk tensor by tensor, so memory stays flat
//! whatever the checkpoint size.
//!
//! [`Fill::Zeros`] leaves every randomly initialised tensor zero and skips over it instead of
//! writing it (a file hole): the checkpoint has the real layout and sizes but occupies almost
//! no disk where the filesystem supports sparse files (ext4, xfs, btrfs, tmpfs, overlayfs).
//! Its outputs are meaningless; it exists for memory and throughput measurements.

use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use rand::{Rng, SeedableRng};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{ModelError, Result};

/// Hugging Face's default shard limit for `save_pretrained` (`max_shard_size="2GB"`), bytes.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// The geometry of a generated checkpoint (mirrors the hub `config.json` fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Geometry {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
}

/// Names of the presets [`preset`] knows.
pub const PRESETS: &[&str] = &["qwen1.5-moe-a2.7b", "demo", "tiny"];

/// A named geometry:
/// - `qwen1.5-moe-a2.7b`: the published model's (hidden 2048, 24 layers, 16 heads, 60 experts
///   top-4, expert intermediate 1408, shared 5632, vocab 151936);
/// - `demo`: the same structure shrunk 4× in width (hidden 512, expert 352, shared 1408);
/// - `tiny`: a small model for tests (hidden 64, 4 layers, 16 experts top-4, vocab 151936).
pub fn preset(name: &str) -> Option<Geometry> {
    let a27b = Geometry {
        vocab_size: 151936,
        hidden_size: 2048,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_key_value_heads: 16,
        intermediate_size: 5632,
        moe_intermediate_size: 1408,
        shared_expert_intermediate_size: 5632,
        num_experts: 60,
        num_experts_per_tok: 4,
        norm_topk_prob: false,
        max_position_embeddings: 8192,
        rope_theta: 1_000_000.0,
    };
    match name {
        "qwen1.5-moe-a2.7b" => Some(a27b),
        "demo" => Some(Geometry {
            hidden_size: 512,
            intermediate_size: 1408,
            moe_intermediate_size: 352,
            shared_expert_intermediate_size: 1408,
            ..a27b
        }),
        "tiny" => Some(Geometry {
            hidden_size: 64,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            intermediate_size: 128,
            moe_intermediate_size: 32,
            shared_expert_intermediate_size: 128,
            num_experts: 16,
            ..a27b
        }),
        _ => None,
    }
}

impl Geometry {
    /// The hub-form `config.json` (the keys of Qwen/Qwen1.5-MoE-A2.7B's).
    pub fn config_json(&self) -> serde_json::Value {
        // The Qwen special ids exist only in the real vocabulary.
        let special = |id: u32| {
            if (id as usize) < self.vocab_size {
                serde_json::json!(id)
            } else {
                serde_json::Value::Null
            }
        };
        serde_json::json!({
            "architectures": ["Qwen2MoeForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": special(151643),
            "eos_token_id": special(151643),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": 21,
            "model_type": "qwen2_moe",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-06,
            "rope_theta": self.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.0.dev0",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
            "decoder_sparse_step": 1,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_experts": self.num_experts,
            "norm_topk_prob": self.norm_topk_prob,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.001
        })
    }

    /// Every tensor `(name, shape, init)` in hub order; `init` is `None` for norms (ones).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Option<f32>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let hd = h / self.num_attention_heads;
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let std = Some(0.02f32);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h], std)];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h], None));
            t.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                None,
            ));
            for (n, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                t.push((format!("{p}.self_attn.{n}.weight"), vec![out, h], std));
                t.push((format!("{p}.self_attn.{n}.bias"), vec![out], std));
            }
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q], std));
            t.push((
                format!("{p}.mlp.gate.weight"),
                vec![self.num_experts, h],
                std,
            ));
            for e in 0..self.num_experts {
                let i = self.moe_intermediate_size;
                t.push((
                    format!("{p}.mlp.experts.{e}.gate_proj.weight"),
                    vec![i, h],
                    std,
                ));
                t.push((
                    format!("{p}.mlp.experts.{e}.up_proj.weight"),
                    vec![i, h],
                    std,
                ));
                t.push((
                    format!("{p}.mlp.experts.{e}.down_proj.weight"),
                    vec![h, i],
                    std,
                ));
            }
            let s = self.shared_expert_intermediate_size;
            t.push((
                format!("{p}.mlp.shared_expert.gate_proj.weight"),
                vec![s, h],
                std,
            ));
            t.push((
                format!("{p}.mlp.shared_expert.up_proj.weight"),
                vec![s, h],
                std,
            ));
            t.push((
                format!("{p}.mlp.shared_expert.down_proj.weight"),
                vec![h, s],
                std,
            ));
            t.push((
                format!("{p}.mlp.shared_expert_gate.weight"),
                vec![1, h],
                std,
            ));
        }
        t.push(("model.norm.weight".to_string(), vec![h], None));
        t.push(("lm_head.weight".to_string(), vec![v, h], std));
        t
    }

    /// Total bytes of the bf16 weights.
    pub fn total_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s, _)| 2 * s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// Shard files (one means a single `model.safetensors`).
    pub files: Vec<String>,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the weight tensors of a generated checkpoint hold (norms are always 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// Seeded uniform values with transformers' `initializer_range` standard deviation.
    #[default]
    Random,
    /// Zeros, left as file holes: the files have their full size but take almost no disk.
    Zeros,
}

/// Writes a random-weight checkpoint of `geometry` into `dir` (created if absent): the
/// safetensors shards (bf16, each at most `max_shard_bytes` of data unless one tensor is
/// larger), the index when sharded, `config.json` and `generation_config.json`.
/// `progress(bytes_done, bytes_total)` is called as data is written.
///
/// Errors: [`ModelError::Io`] naming the file that could not be written.
pub fn write_checkpoint(
    dir: &Path,
    geometry: &Geometry,
    seed: u64,
    max_shard_bytes: u64,
    progress: impl FnMut(u64, u64),
) -> Result<Written> {
    write_checkpoint_filled(dir, geometry, Fill::Random, seed, max_shard_bytes, progress)
}

/// [`write_checkpoint`] with the weights given by `fill`; with [`Fill::Zeros`] the weight
/// tensors are skipped over (file holes), so a checkpoint of the real Qwen1.5-MoE-A2.7B layer
/// geometry costs kilobytes of disk instead of gigabytes.
pub fn write_checkpoint_filled(
    dir: &Path,
    geometry: &Geometry,
    fill: Fill,
    seed: u64,
    max_shard_bytes: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<Written> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors = geometry.tensors();
    let total = geometry.total_bytes();
    // Split into shards in order.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, (_, shape, _)) in tensors.iter().enumerate() {
        let b = 2 * shape.iter().product::<usize>() as u64;
        if cur > 0 && cur + b > max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().unwrap().push(i);
        cur += b;
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let mut done = 0u64;
    let mut weight_map = serde_json::Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let path = dir.join(file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0usize;
        for &i in shard {
            let (name, shape, _) = &tensors[i];
            let b = 2 * shape.iter().product::<usize>();
            header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + b]}));
            off += b;
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        let mut hbytes = serde_json::to_vec(&header).expect("json");
        while !hbytes.len().is_multiple_of(8) {
            hbytes.push(b' ');
        }
        let f = std::fs::File::create(&path).map_err(io(&path))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(io(&path))?;
        w.write_all(&hbytes).map_err(io(&path))?;
        let mut buf = Vec::new();
        for &i in shard {
            let (name, shape, init) = &tensors[i];
            let count: usize = shape.iter().product();
            if init.is_some() && fill == Fill::Zeros {
                w.seek(SeekFrom::Current(2 * count as i64))
                    .map_err(io(&path))?;
                done += 2 * count as u64;
                progress(done, total);
                continue;
            }
            buf.clear();
            buf.reserve(2 * count);
            match init {
                None => {
                    for _ in 0..count {
                        buf.extend_from_slice(&bf16::ONE.to_le_bytes());
                    }
                }
                Some(std) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (seed, name).hash(&mut h);
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(h.finish());
                    let a = std * 3f32.sqrt();
                    for _ in 0..count {
                        let x: f32 = rng.random_range(-a..a);
                        buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
                    }
                }
            }
            w.write_all(&buf).map_err(io(&path))?;
            done += buf.len() as u64;
            progress(done, total);
        }
        w.flush().map_err(io(&path))?;
        // A trailing hole needs the length set explicitly.
        let f = w.into_inner().map_err(|e| io(&path)(e.into_error()))?;
        f.set_len(8 + hbytes.len() as u64 + off as u64)
            .map_err(io(&path))?;
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join(INDEX_FILE);
        std::fs::write(&p, serde_json::to_vec_pretty(&index).expect("json")).map_err(io(&p))?;
    }
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&geometry.config_json()).expect("json"),
    )
    .map_err(io(&p))?;
    let gen = serde_json::json!({
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
        "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
        "temperature": 0.7, "top_p": 0.8, "top_k": 20
    });
    let p = dir.join("generation_config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&gen).expect("json")).map_err(io(&p))?;
    Ok(Written {
        files: names,
        bytes: total,
        tensors: tensors.len(),
    })
}

/// Arguments of `init` (also used by the `faasmoe model init` command).
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Output directory (created if absent).
    #[arg(long)]
    pub out: PathBuf,
    /// Geometry preset: qwen1.5-moe-a2.7b (real sizes), demo (4× narrower), tiny.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Keep only this many decoder layers (the full qwen1.5-moe-a2.7b does not fit 24 GiB).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the vocabulary size.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest shard in bytes (Hugging Face's default 2 GB).
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: u64,
    /// Leave the weights zero as file holes: full-size files that take almost no disk. For
    /// memory and throughput experiments only; the model's outputs are meaningless.
    #[arg(long)]
    pub zeros: bool,
    /// Copy this tokenizer.json into the checkpoint.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl InitArgs {
    /// The arguments `faasmoe model init --preset <preset> --out <out>` gets: every other
    /// field at its command-line default (seed 0, 2 GB shards, random weights, no
    /// tokenizer).
    pub fn new(out: impl Into<PathBuf>, preset: &str) -> Self {
        Self {
            out: out.into(),
            preset: preset.into(),
            layers: None,
            vocab_size: None,
            seed: 0,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            zeros: false,
            tokenizer: None,
        }
    }
}

/// Runs `init`: writes the checkpoint with a progress bar on stderr; returns the geometry.
pub fn init(a: &InitArgs) -> anyhow::Result<Geometry> {
    let Some(mut g) = preset(&a.preset) else {
        anyhow::bail!(
            "unknown preset `{}` (known: {})",
            a.preset,
            PRESETS.join(", ")
        );
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
        a.preset,
        g.num_hidden_layers,
        g.hidden_size,
        g.num_experts,
        g.moe_intermediate_size,
        total as f64 / 1e9,
        a.out.display()
    );
    let bar =
        indicatif::ProgressBar::new(total).with_style(indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?);
    let fill = if a.zeros { Fill::Zeros } else { Fill::Random };
    let w = write_checkpoint_filled(&a.out, &g, fill, a.seed, a.max_shard_bytes, |d, _| {
        bar.set_position(d)
    })?;
    bar.finish_and_clear();
    if let Some(t) = &a.tokenizer {
        std::fs::copy(t, a.out.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("copying {}: {e}", t.display()))?;
    }
    eprintln!(
        "wrote {} tensors in {} file(s): {}",
        w.tensors,
        w.files.len(),
        w.files.join(", ")
    );
    Ok(g)
}

//! Checkpoint loading: generated hub-layout checkpoints, both config forms, and bad inputs
//! that must give errors naming the problem.

use std::path::Path;

use candle_core::DType;
use faasmoe_model::baseline::Baseline;
use faasmoe_model::experts::{ExpertId, ExpertSelection};
use faasmoe_model::fixtures::fixture;
use faasmoe_model::greedy::greedy_batch;
use faasmoe_model::random_checkpoint::{preset, write_checkpoint, write_checkpoint_filled, Fill};
use faasmoe_model::{load_local, Checkpoint, Config, ControlPlane, ExpertSet, ModelError};

fn tiny_geometry() -> faasmoe_model::random_checkpoint::Geometry {
    let mut g = preset("tiny").unwrap();
    g.vocab_size = 512;
    g.num_hidden_layers = 2;
    g
}

fn write_tiny(dir: &Path, max_shard: u64) {
    write_checkpoint(dir, &tiny_geometry(), 7, max_shard, |_, _| {}).unwrap();
}

#[test]
fn generated_sharded_checkpoint_loads_and_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), 200_000);
    let index = std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("model-00001-of-"), "sharded with an index");
    let cfg = Config::from_dir(tmp.path()).unwrap();
    assert_eq!(cfg.rope_theta, 1_000_000.0);
    let (cp, mut backend) = load_local(tmp.path(), DType::F32).unwrap();
    let prompt: Vec<u32> = vec![1, 5, 9, 200, 7];
    let split = greedy_batch(&cp, &mut backend, std::slice::from_ref(&prompt), 8).unwrap();
    let mut base = Baseline::load(tmp.path(), DType::F32).unwrap();
    assert_eq!(base.greedy(&prompt, 8).unwrap(), split[0]);
}

/// Computing the shared expert ahead (while remote experts work) gives bit-identical hidden
/// states to computing it in `complete_moe`.
#[test]
fn shared_expert_ahead_of_complete_moe_changes_nothing() {
    use faasmoe_model::{ExpertBackend, Step};
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), u64::MAX);
    let (cp, mut backend) = load_local(tmp.path(), DType::F32).unwrap();
    let prompt: Vec<u32> = vec![1, 5, 9, 200, 7];
    let batch = [(0usize, prompt.as_slice())];
    let run = |backend: &mut faasmoe_model::InProcessBackend, ahead: bool| -> Vec<f32> {
        let mut cache = cp.new_cache();
        let mut pass = cp.start(&batch).unwrap();
        let mut moe_layers = 0;
        loop {
            match cp.advance(&mut pass, &mut [&mut cache]).unwrap() {
                Step::Experts(b) => {
                    if ahead {
                        cp.shared_expert(&mut pass).unwrap();
                        cp.shared_expert(&mut pass).unwrap(); // idempotent
                    }
                    let out = backend.routed(&b).unwrap();
                    cp.complete_moe(&mut pass, &out).unwrap();
                    moe_layers += 1;
                }
                Step::Done(h) => {
                    assert_eq!(moe_layers, 2);
                    return h.flatten_all().unwrap().to_vec1().unwrap();
                }
            }
        }
    };
    assert_eq!(run(&mut backend, true), run(&mut backend, false));
    // Without a pending MoE layer it is an error, not a panic.
    let mut pass = cp.start(&batch).unwrap();
    assert!(matches!(
        cp.shared_expert(&mut pass),
        Err(ModelError::InvalidInput(_))
    ));
}

#[test]
fn generator_is_deterministic_whatever_the_shard_size() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_tiny(a.path(), u64::MAX);
    write_tiny(b.path(), 100_000);
    let mut ca = Checkpoint::open(a.path(), DType::F32).unwrap();
    let mut cb = Checkpoint::open(b.path(), DType::F32).unwrap();
    let name = "model.layers.1.mlp.experts.3.up_proj.weight";
    let ta = ca.load(name, &[32, 64]).unwrap();
    let tb = cb.load(name, &[32, 64]).unwrap();
    let d: f32 = (ta - tb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn zero_fill_writes_full_size_sparse_files_that_load_as_zeros_with_unit_norms() {
    use std::os::unix::fs::MetadataExt;
    let (z, r) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut g = tiny_geometry();
    g.hidden_size = 256;
    g.moe_intermediate_size = 512;
    write_checkpoint_filled(z.path(), &g, Fill::Zeros, 7, u64::MAX, |_, _| {}).unwrap();
    write_checkpoint(r.path(), &g, 7, u64::MAX, |_, _| {}).unwrap();
    let (mz, mr) = (
        std::fs::metadata(z.path().join("model.safetensors")).unwrap(),
        std::fs::metadata(r.path().join("model.safetensors")).unwrap(),
    );
    assert_eq!(mz.len(), mr.len(), "same layout and size");
    eprintln!(
        "zero-filled: {} bytes long, {} bytes allocated",
        mz.len(),
        512 * mz.blocks()
    );
    let mut ck = Checkpoint::open(z.path(), DType::F32).unwrap();
    let up = ck
        .load("model.layers.1.mlp.experts.3.up_proj.weight", &[512, 256])
        .unwrap();
    let abs: f32 = up.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert_eq!(abs, 0.0);
    let norm = ck.load("model.norm.weight", &[256]).unwrap();
    assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 256]);
    // The file after the last tensor is complete: the final tensor (lm_head) loads too.
    let head = ck.load("lm_head.weight", &[g.vocab_size, 256]).unwrap();
    assert_eq!(head.dims(), &[g.vocab_size, 256]);
}

#[test]
fn config_reads_hub_and_transformers5_forms() {
    if let Some(d) = fixture("qwen15-moe-tiny") {
        let c = Config::from_dir(&d).unwrap();
        assert_eq!(
            (c.rope_theta, c.sliding_window, c.norm_topk_prob),
            (1e6, None, false)
        );
        assert_eq!(c.moe_layers().count(), 4);
    }
    if let Some(d) = fixture("qwen2-moe-gqa-mixed") {
        let c = Config::from_dir(&d).unwrap();
        assert_eq!(
            (c.rope_theta, c.num_key_value_heads, c.norm_topk_prob),
            (10000.0, 2, true)
        );
        assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![0, 2]);
        assert!(c.eos_token_ids.is_empty());
    }
}

fn config_error(json: serde_json::Value) -> String {
    Config::from_json(&json.to_string())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_configs_name_the_field() {
    let good = tiny_geometry().config_json();
    let mut j = good.clone();
    j["model_type"] = "mixtral".into();
    assert!(config_error(j).contains("mixtral"));
    let mut j = good.clone();
    j["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    assert!(config_error(j).contains("LlamaForCausalLM"));
    let mut j = good.clone();
    j.as_object_mut().unwrap().remove("hidden_size");
    assert!(config_error(j).contains("hidden_size"));
    let mut j = good.clone();
    j["num_key_value_heads"] = 3.into();
    assert!(config_error(j).contains("num_key_value_heads"));
    let mut j = good.clone();
    j["num_experts_per_tok"] = 99.into();
    assert!(config_error(j).contains("num_experts_per_tok"));
    let mut j = good;
    j["mlp_only_layers"] = serde_json::json!([9]);
    assert!(config_error(j).contains("mlp_only_layers"));
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), u64::MAX);
    let f = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    let e = Checkpoint::open(tmp.path(), DType::F32).unwrap_err();
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), 100_000);
    let index_path = tmp.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.self_attn.k_proj.bias");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let mut ckpt = Checkpoint::open(tmp.path(), DType::F32).unwrap();
    let e = ControlPlane::load(&mut ckpt).unwrap_err();
    assert!(
        e.to_string()
            .contains("model.layers.1.self_attn.k_proj.bias"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_an_error_naming_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), u64::MAX);
    // Claim a larger expert intermediate size than the tensors have.
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = 48.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut ckpt = Checkpoint::open(tmp.path(), DType::F32).unwrap();
    let e = ExpertSet::load(&mut ckpt, &ExpertSelection::of_layer(0, [2])).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::WrongShape { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.experts.2.gate_proj.weight")
            && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn unknown_expert_and_out_of_vocab_token_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), u64::MAX);
    let mut ckpt = Checkpoint::open(tmp.path(), DType::F32).unwrap();
    let e = ExpertSet::load(&mut ckpt, &ExpertSelection::of_layer(0, [16])).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::UnknownExpert {
                layer: 0,
                expert: 16
            }
        ),
        "{e}"
    );
    let (cp, mut backend) = load_local(tmp.path(), DType::F32).unwrap();
    let e = greedy_batch(&cp, &mut backend, &[vec![3, 512]], 1).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::TokenOutOfRange {
                token: 512,
                vocab_size: 512
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("512"));
    let set = backend.experts();
    let x = candle_core::Tensor::zeros((2, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = set
        .forward(
            ExpertId {
                layer: 0,
                expert: 99,
            },
            &x,
        )
        .unwrap_err();
    assert!(matches!(e, ModelError::UnknownExpert { .. }));
}

/// Bytes of the 2-D tensors of a checkpoint's safetensors files that the control plane holds
/// (every matrix but the routed experts'), in their stored dtype, read from the files'
/// headers with the `safetensors` crate.
fn control_plane_matrix_bytes(dir: &Path) -> usize {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("model") || !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for (t, info) in meta.tensors() {
            if info.shape.len() == 2 && !t.contains(".mlp.experts.") {
                total += info.shape.iter().product::<usize>() * info.dtype.size();
            }
        }
    }
    total
}

/// The bytes a controller's resident memory is compared with (`faasmoe bench`, issue 15) are
/// those of the matrices it holds: the embedding and LM head, attention, routers, shared
/// experts and their gates, dense MLPs, no routed expert; for real checkpoints (bf16, f32)
/// and a generated one.
#[test]
fn control_plane_resident_bytes_are_its_matrices_in_their_stored_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), 200_000);
    let mut dirs = vec![tmp.path().to_path_buf()];
    dirs.extend(
        ["qwen15-moe-tiny", "qwen2-moe-gqa-mixed"]
            .iter()
            .filter_map(|f| fixture(f)),
    );
    for dir in dirs {
        let mut ckpt = Checkpoint::open(&dir, DType::F32).unwrap();
        let cp = ControlPlane::load(&mut ckpt).unwrap();
        let expected = control_plane_matrix_bytes(&dir);
        assert_eq!(cp.resident_weight_bytes(), expected, "{}", dir.display());
        // The embedding is the one matrix a decode step does not read in full.
        let cfg = cp.config();
        let embed = cfg.vocab_size * cfg.hidden_size;
        assert!(cp.weight_bytes() < expected && expected - cp.weight_bytes() >= embed * 2);
    }
}

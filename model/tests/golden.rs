//! The split model against transformers' golden outputs (`../shared/fixtures`), with the
//! fixtures README's tolerances: max |Δlogit| ≤ 1e-3, identical top-k order where the golden
//! gap exceeds 1e-3, identical router choices and greedy tokens.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use faasmoe_model::baseline::Baseline;
use faasmoe_model::control_plane::argmax;
use faasmoe_model::fixtures::fixture;
use faasmoe_model::greedy::greedy_batch;
use faasmoe_model::{load_local, ExpertBackend, InProcessBackend, KvCache, RoutedBatch};

const TOL: f32 = 1e-3;

struct Golden(HashMap<String, Tensor>);

impl Golden {
    fn load(dir: &Path) -> Self {
        Self(candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap())
    }
    fn ids(&self, key: &str) -> Vec<u32> {
        self.0[key]
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    fn t(&self, key: &str) -> &Tensor {
        &self.0[key]
    }
    fn n_prompts(&self) -> usize {
        (0..)
            .take_while(|i| self.0.contains_key(&format!("prompt.{i}.input_ids")))
            .count()
    }
}

/// Records the router's choices per MoE layer while computing in-process.
struct Recording {
    inner: InProcessBackend,
    /// layer → per row, experts sorted ascending.
    routes: Vec<(usize, Vec<Vec<u32>>)>,
}

impl ExpertBackend for Recording {
    fn routed(&mut self, b: &RoutedBatch) -> faasmoe_model::Result<Tensor> {
        let rows = b
            .routes
            .iter()
            .map(|r| {
                let mut e: Vec<u32> = r.iter().map(|&(e, _)| e as u32).collect();
                e.sort();
                e
            })
            .collect();
        self.routes.push((b.layer, rows));
        self.inner.routed(b)
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_fixture(name: &str) {
    let Some(dir) = fixture(name) else { return };
    let golden = Golden::load(&dir);
    let (cp, backend) = load_local(&dir, DType::F32).unwrap();
    let n = golden.n_prompts();
    assert_eq!(n, 4, "fixture has four prompts");
    let mut prompts = Vec::new();
    for i in 0..n {
        let ids = golden.ids(&format!("prompt.{i}.input_ids"));
        let mut rec = Recording {
            inner: backend.clone(),
            routes: vec![],
        };
        let mut cache = KvCache::new(cp.config().num_hidden_layers);
        let (_pass, hidden) = cp
            .forward(&[(0, &ids)], &mut [&mut cache], &mut rec)
            .unwrap();
        let logits = cp.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();

        // last_logits
        let want_last: Vec<f32> = golden
            .t(&format!("prompt.{i}.last_logits"))
            .to_vec1()
            .unwrap();
        let d = max_abs_diff(logits.last().unwrap(), &want_last);
        assert!(d <= TOL, "{name} prompt {i}: last_logits max |Δ| = {d}");

        // top-16 values and indices at every position
        let want_v: Vec<Vec<f32>> = golden
            .t(&format!("prompt.{i}.topk_values"))
            .to_vec2()
            .unwrap();
        let want_i: Vec<Vec<i64>> = golden
            .t(&format!("prompt.{i}.topk_indices"))
            .to_vec2()
            .unwrap();
        for (pos, row) in logits.iter().enumerate() {
            for (k, (&gi, &gv)) in want_i[pos].iter().zip(&want_v[pos]).enumerate() {
                let got = row[gi as usize];
                assert!(
                    (got - gv).abs() <= TOL,
                    "{name} prompt {i} pos {pos} top{k}: {got} vs {gv}"
                );
            }
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
            for k in 0..want_i[pos].len() {
                let gap_prev = if k > 0 {
                    want_v[pos][k - 1] - want_v[pos][k]
                } else {
                    f32::INFINITY
                };
                let gap_next = if k + 1 < want_v[pos].len() {
                    want_v[pos][k] - want_v[pos][k + 1]
                } else {
                    f32::INFINITY
                };
                if gap_prev > TOL && gap_next > TOL {
                    assert_eq!(
                        order[k] as i64, want_i[pos][k],
                        "{name} prompt {i} pos {pos}: top-k index {k}"
                    );
                }
            }
        }

        // router choices at every MoE layer and token
        let want_r = golden.t(&format!("prompt.{i}.router_topk"));
        let (n_moe, seq, k) = want_r.dims3().unwrap();
        let want_r: Vec<Vec<Vec<i64>>> = want_r.to_vec3().unwrap();
        assert_eq!(rec.routes.len(), n_moe, "{name}: MoE layers");
        let moe_layers: Vec<usize> = cp.config().moe_layers().collect();
        for (m, (layer, rows)) in rec.routes.iter().enumerate() {
            assert_eq!(*layer, moe_layers[m]);
            assert_eq!(rows.len(), seq);
            for (t, experts) in rows.iter().enumerate() {
                assert_eq!(experts.len(), k);
                let want: Vec<u32> = want_r[m][t].iter().map(|&e| e as u32).collect();
                assert_eq!(
                    experts, &want,
                    "{name} prompt {i}: router at layer {layer} token {t}"
                );
            }
        }
        prompts.push(ids);
    }

    // greedy tokens with the KV cache, each prompt alone and all four in one ragged batch
    let mut be = backend.clone();
    let batched = greedy_batch(&cp, &mut be, &prompts, 24).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let want = golden.ids(&format!("prompt.{i}.greedy_ids"));
        let alone = greedy_batch(&cp, &mut be, std::slice::from_ref(p), 24).unwrap();
        assert_eq!(alone[0], want, "{name} prompt {i}: greedy alone");
        assert_eq!(
            batched[i], want,
            "{name} prompt {i}: greedy in a batch of four"
        );
    }
}

#[test]
fn split_model_matches_transformers_on_qwen15_moe_tiny() {
    check_fixture("qwen15-moe-tiny");
}

#[test]
fn split_model_matches_transformers_on_qwen2_moe_gqa_mixed_sharded_f32() {
    check_fixture("qwen2-moe-gqa-mixed");
}

#[test]
fn candle_transformers_baseline_agrees_with_split_model_on_qwen15_moe_tiny() {
    let Some(dir) = fixture("qwen15-moe-tiny") else {
        return;
    };
    let golden = Golden::load(&dir);
    let (cp, mut backend) = load_local(&dir, DType::F32).unwrap();
    let mut base = Baseline::load(&dir, DType::F32).unwrap();
    for i in 0..golden.n_prompts() {
        let ids = golden.ids(&format!("prompt.{i}.input_ids"));
        base.reset();
        let got = base.forward(&ids).unwrap().to_vec1::<f32>().unwrap();
        let mut cache = cp.new_cache();
        let (_, h) = cp
            .forward(&[(0, &ids)], &mut [&mut cache], &mut backend)
            .unwrap();
        let split = cp.logits(&h).unwrap().to_vec2::<f32>().unwrap();
        let d = max_abs_diff(&got, split.last().unwrap());
        assert!(d <= TOL, "prompt {i}: baseline vs split max |Δ| = {d}");
        assert_eq!(argmax(&got), argmax(split.last().unwrap()));
        let want = golden.ids(&format!("prompt.{i}.greedy_ids"));
        assert_eq!(
            base.greedy(&ids, 24).unwrap(),
            want,
            "prompt {i}: baseline greedy"
        );
    }
}

/// `Baseline::forward_batch` (the decode bench's baseline) gives each sequence of a batch the
/// logits of that sequence alone, prefill and one decode step (two different prompts of one
/// length, so rows mixed up within the batch would show); and refuses ragged or empty batches
/// and tokens past the vocabulary.
#[test]
fn baseline_batch_forward_matches_one_sequence_on_qwen15_moe_tiny() {
    let Some(dir) = fixture("qwen15-moe-tiny") else {
        return;
    };
    let golden = Golden::load(&dir);
    let a = golden.ids("prompt.0.input_ids");
    let mut b = a.clone();
    b.rotate_left(1);
    b.reverse();
    assert_ne!(a, b);
    let mut base = Baseline::load(&dir, DType::F32).unwrap();
    let mut alone = |ids: &[u32]| {
        base.reset();
        let pre = base.forward(ids).unwrap().to_vec1::<f32>().unwrap();
        let next = argmax(&pre);
        let step = base.forward(&[next]).unwrap().to_vec1::<f32>().unwrap();
        (pre, next, step)
    };
    let (pre_a, next_a, step_a) = alone(&a);
    let (pre_b, next_b, step_b) = alone(&b);
    assert!(
        max_abs_diff(&pre_a, &pre_b) > TOL,
        "the two prompts must differ"
    );
    base.reset();
    let pre = base
        .forward_batch(&[&a, &b, &a])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(base.cached_len(), a.len());
    let step = base
        .forward_batch(&[&[next_a], &[next_b], &[next_a]])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!((pre.len(), step.len()), (3, 3));
    for (i, (want_pre, want_step)) in [(&pre_a, &step_a), (&pre_b, &step_b), (&pre_a, &step_a)]
        .into_iter()
        .enumerate()
    {
        let d = max_abs_diff(&pre[i], want_pre);
        assert!(d <= TOL, "prefill row {i}: max |Δ| = {d}");
        let d = max_abs_diff(&step[i], want_step);
        assert!(d <= TOL, "decode row {i}: max |Δ| = {d}");
    }
    base.reset();
    assert!(base.forward_batch(&[]).is_err());
    assert!(base.forward_batch(&[&a, &a[1..]]).is_err());
    let vocab = faasmoe_model::Config::from_dir(&dir).unwrap().vocab_size as u32;
    let err = base.forward_batch(&[&[vocab]]).unwrap_err();
    assert!(
        matches!(err, faasmoe_model::ModelError::TokenOutOfRange { .. }),
        "{err}"
    );
    assert_eq!(
        base.cached_len(),
        0,
        "a refused batch leaves the cache alone"
    );
}

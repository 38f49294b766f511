//! A sequence's logits do not depend on its batch, its chunking or its cache's history: bit
//! for bit through the whole model (kernel, attention on the KV cache, experts in-process),
//! on both fixture checkpoints (`../shared/fixtures`).

use candle_core::DType;
use faasmoe_model::control_plane::{argmax, last_logits};
use faasmoe_model::fixtures::fixture;
use faasmoe_model::kv_cache::MIN_CAPACITY;
use faasmoe_model::{load_local, ControlPlane, InProcessBackend, KvCache};

const FIXTURES: [&str; 2] = ["qwen15-moe-tiny", "qwen2-moe-gqa-mixed"];

/// One pass over `feeds[i]` for each sequence; the last row's logits per sequence.
fn step(
    cp: &ControlPlane,
    backend: &mut InProcessBackend,
    caches: &mut [KvCache],
    feeds: &[Vec<u32>],
) -> Vec<Vec<f32>> {
    let batch: Vec<(usize, &[u32])> = caches
        .iter()
        .zip(feeds)
        .map(|(c, f)| (c.seq_len(), f.as_slice()))
        .collect();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let (pass, hidden) = cp.forward(&batch, &mut refs, backend).unwrap();
    last_logits(cp, &pass, &hidden)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn prompt(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7919 + i * 104_729 + 13) % vocab as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_sequence_decoded_in_a_batch_of_8_equals_it_decoded_alone_bit_for_bit() {
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { continue };
        let (cp, mut backend) = load_local(&dir, DType::F32).unwrap();
        let vocab = cp.config().vocab_size;
        let prompts: Vec<Vec<u32>> = (0..8)
            .map(|s| prompt(s, 3 + 5 * s as usize, vocab))
            .collect();
        let steps = 6;
        // Alone: sequence 0 (greedy).
        let mut alone = vec![cp.new_cache()];
        let mut feed = vec![prompts[0].clone()];
        let mut want = Vec::new();
        for _ in 0..steps {
            let l = step(&cp, &mut backend, &mut alone, &feed).remove(0);
            feed = vec![vec![argmax(&l)]];
            want.push(l);
        }
        // In a batch of 8 ragged prompts, prefilled and decoded together.
        let mut caches: Vec<KvCache> = (0..8).map(|_| cp.new_cache()).collect();
        let mut feeds = prompts.clone();
        for (t, w) in want.iter().enumerate() {
            let logits = step(&cp, &mut backend, &mut caches, &feeds);
            assert!(
                bits(&logits[0]) == bits(w),
                "{name}: step {t}: logits in a batch of 8 differ from alone"
            );
            feeds = logits.iter().map(|l| vec![argmax(l)]).collect();
        }
        // Mixed steps as the engine runs them: sequence 0 decodes while others prefill.
        let mut caches: Vec<KvCache> = (0..8).map(|_| cp.new_cache()).collect();
        let l = step(&cp, &mut backend, &mut caches[..1], &prompts[..1]).remove(0);
        assert_eq!(bits(&l), bits(&want[0]), "{name}: prefill alone");
        let mut feeds: Vec<Vec<u32>> = vec![vec![argmax(&l)]];
        feeds.extend(prompts[1..].iter().cloned());
        let logits = step(&cp, &mut backend, &mut caches, &feeds);
        assert_eq!(
            bits(&logits[0]),
            bits(&want[1]),
            "{name}: a decode row next to 7 prefills"
        );
    }
}

#[test]
fn cache_growth_chunking_and_truncate_then_reappend_equal_a_fresh_run() {
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { continue };
        let (cp, mut backend) = load_local(&dir, DType::F32).unwrap();
        let vocab = cp.config().vocab_size;
        // Crosses the first two doublings (16 → 32 → 64) while decoding one token at a time.
        let tokens = prompt(3, 2 * MIN_CAPACITY + 5, vocab);
        let p = 5;

        // Reference: the prompt at once, then one token per step; logits after each token.
        let mut fresh = vec![cp.new_cache()];
        let mut want = vec![step(&cp, &mut backend, &mut fresh, &[tokens[..p].to_vec()]).remove(0)];
        let mut caps = vec![fresh[0].capacity()];
        for &t in &tokens[p..] {
            want.push(step(&cp, &mut backend, &mut fresh, &[vec![t]]).remove(0));
            caps.push(fresh[0].capacity());
        }
        assert_eq!(fresh[0].seq_len(), tokens.len());
        assert!(
            caps.contains(&MIN_CAPACITY) && caps.contains(&(2 * MIN_CAPACITY)),
            "{name}: capacities {caps:?}"
        );
        assert_eq!(
            fresh[0].capacity(),
            4 * MIN_CAPACITY,
            "{name}: doubled twice"
        );

        // The same tokens in chunks of 7: each chunk's last logits equal the reference's.
        let mut chunked = vec![cp.new_cache()];
        let mut fed = 0;
        for c in tokens.chunks(7) {
            let l = step(&cp, &mut backend, &mut chunked, &[c.to_vec()]).remove(0);
            fed += c.len();
            if fed >= p {
                assert_eq!(
                    bits(&l),
                    bits(&want[fed - p]),
                    "{name}: chunk ending at {fed}"
                );
            }
        }

        // Truncate back across a doubling boundary and re-append: equals the fresh run.
        let back = MIN_CAPACITY - 3;
        fresh[0].truncate(back).unwrap();
        assert_eq!(fresh[0].seq_len(), back);
        assert_eq!(
            fresh[0].capacity(),
            4 * MIN_CAPACITY,
            "truncate keeps the buffers"
        );
        for (i, &t) in tokens[back..].iter().enumerate() {
            let l = step(&cp, &mut backend, &mut fresh, &[vec![t]]).remove(0);
            assert_eq!(
                bits(&l),
                bits(&want[back + i + 1 - p]),
                "{name}: re-appended token {} after truncate",
                back + i
            );
        }
        // A pass that does not start at the cached length is refused.
        let n = fresh[0].seq_len();
        let mut refs = vec![&mut fresh[0]];
        assert!(cp
            .forward(&[(n - 1, &tokens[..1])], &mut refs, &mut backend)
            .is_err());
    }
}

//! Greedy decoding over a batch of sequences with KV caches, for tests, the local-split mode
//! and the baselines. (Sampling and scheduling live in the controller.)

use crate::control_plane::{argmax, last_logits, ControlPlane, ExpertBackend, KvCache};
use crate::error::Result;

/// Greedy-decodes `max_new` tokens for every prompt together: one prefill pass over all
/// prompts (different lengths), then one decode step per token for all sequences.
/// Pure argmax, no stop tokens. Returns the new token ids per prompt.
pub fn greedy_batch(
    cp: &ControlPlane,
    backend: &mut dyn ExpertBackend,
    prompts: &[Vec<u32>],
    max_new: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| cp.new_cache()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(max_new); prompts.len()];
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..max_new {
        let batch: Vec<(usize, &[u32])> = caches
            .iter()
            .zip(next.iter())
            .map(|(c, t)| (c.seq_len(), t.as_slice()))
            .collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let (pass, hidden) = cp.forward(&batch, &mut refs, backend)?;
        let logits = last_logits(cp, &pass, &hidden)?.to_vec2::<f32>()?;
        for (i, row) in logits.iter().enumerate() {
            let t = argmax(row);
            out[i].push(t);
            next[i] = vec![t];
        }
    }
    Ok(out)
}

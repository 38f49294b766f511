//! Next-token sampling: greedy, or temperature → top-k → top-p (nucleus) as in transformers'
//! `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, applied in that order.

use rand::{Rng, SeedableRng};

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
}

/// A per-sequence sampler with its own seeded RNG (same seed → same tokens).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler; `seed` None draws one from the OS.
    pub fn new(params: SamplingParams, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token from `logits: [vocab]`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return faasmoe_model::control_plane::argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| {
            logits[b]
                .partial_cmp(&logits[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0]] / p.temperature;
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| (logits[i] / p.temperature - max).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let mut r: f32 = self.rng.random();
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return idx[i] as u32;
            }
            r -= x;
        }
        idx[probs.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let mut g = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            None,
        );
        assert_eq!(g.sample(&logits), 1);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone(), Some(5));
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p, Some(5));
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-k 2 keeps tokens 1 and 2"
        );
        assert!(a.contains(&1) && a.contains(&2));
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.3,
            },
            Some(1),
        );
        assert!(
            (0..20).all(|_| s.sample(&logits) == 1),
            "top-p 0.3 keeps only the best token"
        );
    }
}

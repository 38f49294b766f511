//! The deployment layout: which routed experts are packed into which function.
//!
//! A *function* is a deployable set of experts of one MoE layer; *expert granularity* `g` is
//! the number of experts per function (1 … a whole layer). The controller packs all rows of
//! a layer step that go to one function into one request (sent to the subject of the
//! function's first expert; every expert subject of a function shares its queue group), the
//! broker spawns workers per function, the worker serves one function. All three derive the
//! same layout from `(moe layers, num_experts, g)` here.

use serde::{Deserialize, Serialize};

/// One function: experts `experts` of MoE layer `layer`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Function id, NATS-token safe: `l<layer>-e<first>-<last>` (inclusive range).
    pub id: String,
    /// Decoder layer index.
    pub layer: u32,
    /// Expert indices, ascending and contiguous.
    pub experts: Vec<u32>,
}

impl FunctionSpec {
    /// The function of experts `first..=last` of `layer`.
    pub fn new(layer: u32, first: u32, last: u32) -> Self {
        Self {
            id: format!("l{layer}-e{first}-{last}"),
            layer,
            experts: (first..=last).collect(),
        }
    }

    /// The `--experts` spec of this function for the worker: `<layer>:<first>-<last>`.
    pub fn experts_spec(&self) -> String {
        format!(
            "{}:{}-{}",
            self.layer,
            self.experts[0],
            self.experts[self.experts.len() - 1]
        )
    }

    /// Parses an id made by [`FunctionSpec::new`].
    pub fn parse_id(id: &str) -> Option<Self> {
        let rest = id.strip_prefix('l')?;
        let (layer, rest) = rest.split_once("-e")?;
        let (a, b) = rest.split_once('-')?;
        let (layer, a, b) = (layer.parse().ok()?, a.parse().ok()?, b.parse().ok()?);
        (a <= b).then(|| Self::new(layer, a, b))
    }
}

/// The functions of a model at one granularity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Experts per function (the last function of a layer may hold fewer).
    pub granularity: u32,
    /// Experts per MoE layer.
    pub num_experts: u32,
    /// All functions, by layer then first expert.
    pub functions: Vec<FunctionSpec>,
}

impl Layout {
    /// Splits every MoE layer's `num_experts` into functions of `granularity` experts
    /// (clamped to `1..=num_experts`).
    pub fn new(moe_layers: &[u32], num_experts: u32, granularity: u32) -> Self {
        let g = granularity.clamp(1, num_experts.max(1));
        let functions = moe_layers
            .iter()
            .flat_map(|&l| {
                (0..num_experts)
                    .step_by(g as usize)
                    .map(move |a| FunctionSpec::new(l, a, (a + g - 1).min(num_experts - 1)))
            })
            .collect();
        Self {
            granularity: g,
            num_experts,
            functions,
        }
    }

    /// The MoE layer indices the functions cover, ascending (as given to [`Layout::new`]).
    pub fn moe_layers(&self) -> Vec<u32> {
        let mut layers: Vec<u32> = self.functions.iter().map(|f| f.layer).collect();
        layers.dedup();
        layers
    }

    /// Index into [`Layout::functions`] of the function holding `expert` of `layer`.
    pub fn function_of(&self, layer: u32, expert: u32) -> Option<usize> {
        let per_layer = self.num_experts.div_ceil(self.granularity) as usize;
        let first = self.functions.iter().position(|f| f.layer == layer)?;
        let i = first + (expert / self.granularity) as usize;
        (expert < self.num_experts && i < first + per_layer).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularities_partition_every_layer() {
        for g in [1, 2, 4, 7, 10, 20, 60, 99] {
            let l = Layout::new(&[0, 2], 60, g);
            for layer in [0, 2] {
                for e in 0..60 {
                    let f = &l.functions[l.function_of(layer, e).unwrap()];
                    assert_eq!(f.layer, layer);
                    assert!(f.experts.contains(&e), "g={g} e={e} {f:?}");
                }
            }
            assert_eq!(l.function_of(1, 0), None);
            assert_eq!(l.function_of(0, 60), None);
        }
        assert_eq!(Layout::new(&[0], 60, 4).functions.len(), 15);
        assert_eq!(Layout::new(&[0], 60, 60).functions[0].id, "l0-e0-59");
    }

    #[test]
    fn ids_round_trip() {
        let f = FunctionSpec::new(3, 8, 11);
        assert_eq!(FunctionSpec::parse_id(&f.id), Some(f.clone()));
        assert_eq!(f.experts_spec(), "3:8-11");
        assert_eq!(FunctionSpec::parse_id("x"), None);
    }
}

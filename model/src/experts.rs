//! Routed experts: the execution plane's math.
//!
//! An expert is Qwen2-MoE's SwiGLU FFN, `down(silu(gate(x)) * up(x))`
//! (transformers' `Qwen2MoeMLP`). An [`ExpertSet`] holds any subset of the routed experts of
//! one or several layers — one expert, a function of g experts, a whole layer — and loads
//! only those tensors, so its resident memory is proportional to the experts it holds.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};

/// Identifies one routed expert: decoder layer index and expert index within the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertId {
    /// Decoder layer index (0-based, counting dense layers too).
    pub layer: usize,
    /// Expert index in `0..num_experts`.
    pub expert: usize,
}

/// The checkpoint name prefix of a routed expert: `model.layers.{l}.mlp.experts.{e}`.
pub fn expert_prefix(id: ExpertId) -> String {
    format!("model.layers.{}.mlp.experts.{}", id.layer, id.expert)
}

/// A SwiGLU feed-forward block (routed expert, shared expert or dense MLP).
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` with gate/up `[intermediate, hidden]` and
    /// down `[hidden, intermediate]`.
    pub fn load(ckpt: &mut Checkpoint, prefix: &str, hidden: usize, intermediate: usize) -> Result<Self> {
        let gate = ckpt.load(&format!("{prefix}.gate_proj.weight"), &[intermediate, hidden])?;
        let up = ckpt.load(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?;
        let down = ckpt.load(&format!("{prefix}.down_proj.weight"), &[hidden, intermediate])?;
        Ok(Self {
            gate_proj: Linear::new(gate, None),
            up_proj: Linear::new(up, None),
            down_proj: Linear::new(down, None),
        })
    }

    /// `xs: [n, hidden]` → `[n, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        let up = self.up_proj.forward(xs)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }

    /// Bytes held by the three weight matrices.
    pub fn weight_bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .map(|l| l.weight().elem_count() * l.weight().dtype().size_in_bytes())
            .sum()
    }
}

/// Which experts an [`ExpertSet`] (a function) holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpertSelection(pub Vec<ExpertId>);

impl ExpertSelection {
    /// Every routed expert of the given MoE layers.
    pub fn whole_layers(layers: &[usize], num_experts: usize) -> Self {
        Self(
            layers
                .iter()
                .flat_map(|&layer| (0..num_experts).map(move |expert| ExpertId { layer, expert }))
                .collect(),
        )
    }

    /// Parses `LAYER:SPEC[;LAYER:SPEC...]` where SPEC is `all`, a range `a-b` (inclusive) or
    /// a list `a,b,c`; `all` needs `num_experts`. Example: `0:0-3;2:all`.
    pub fn parse(spec: &str, num_experts: usize) -> std::result::Result<Self, String> {
        let mut ids = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (layer, experts) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}`: expected LAYER:EXPERTS (e.g. 0:0-3)"))?;
            let layer: usize = layer.trim().parse().map_err(|_| format!("`{part}`: bad layer `{layer}`"))?;
            let bad = |x: &str| format!("`{part}`: bad expert `{x}`");
            let experts = experts.trim();
            let list: Vec<usize> = if experts == "all" {
                (0..num_experts).collect()
            } else if let Some((a, b)) = experts.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| bad(a))?;
                let b: usize = b.trim().parse().map_err(|_| bad(b))?;
                if a > b {
                    return Err(format!("`{part}`: empty range"));
                }
                (a..=b).collect()
            } else {
                experts.split(',').map(|x| x.trim().parse().map_err(|_| bad(x))).collect::<std::result::Result<_, _>>()?
            };
            ids.extend(list.into_iter().map(|expert| ExpertId { layer, expert }));
        }
        if ids.is_empty() {
            return Err("no experts selected".into());
        }
        ids.sort();
        ids.dedup();
        Ok(Self(ids))
    }

    /// Experts `experts` of one layer.
    pub fn of_layer(layer: usize, experts: impl IntoIterator<Item = usize>) -> Self {
        Self(experts.into_iter().map(|expert| ExpertId { layer, expert }).collect())
    }
}

/// A token row's routing within one MoE layer: `(expert, routing weight)` pairs.
pub type RowRoutes = Vec<(usize, f32)>;

/// A set of routed experts (one function's worth, or all of them in-process).
#[derive(Debug, Clone)]
pub struct ExpertSet {
    hidden_size: usize,
    experts: BTreeMap<ExpertId, SwiGlu>,
}

impl ExpertSet {
    /// Loads exactly the experts of `selection` from the checkpoint, then unmaps its files.
    ///
    /// Errors: an id outside the config (`UnknownExpert`), a layer that is not MoE, a missing
    /// or wrongly shaped tensor.
    pub fn load(ckpt: &mut Checkpoint, selection: &ExpertSelection) -> Result<Self> {
        let cfg = ckpt.config().clone();
        let mut experts = BTreeMap::new();
        for &id in &selection.0 {
            if id.layer >= cfg.num_hidden_layers || !cfg.is_moe_layer(id.layer) || id.expert >= cfg.num_experts {
                return Err(ModelError::UnknownExpert { layer: id.layer, expert: id.expert });
            }
            let mlp = SwiGlu::load(ckpt, &expert_prefix(id), cfg.hidden_size, cfg.moe_intermediate_size)?;
            experts.insert(id, mlp);
        }
        ckpt.release_files();
        Ok(Self { hidden_size: cfg.hidden_size, experts })
    }

    /// Hidden size `h` of the rows this set takes.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The experts held, ascending.
    pub fn ids(&self) -> impl Iterator<Item = ExpertId> + '_ {
        self.experts.keys().copied()
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: ExpertId) -> bool {
        self.experts.contains_key(&id)
    }

    /// Bytes of expert weights held.
    pub fn weight_bytes(&self) -> usize {
        self.experts.values().map(SwiGlu::weight_bytes).sum()
    }

    /// One expert on `xs: [n, hidden]` → `[n, hidden]` (unweighted).
    pub fn forward(&self, id: ExpertId, xs: &Tensor) -> Result<Tensor> {
        let mlp = self
            .experts
            .get(&id)
            .ok_or(ModelError::UnknownExpert { layer: id.layer, expert: id.expert })?;
        mlp.forward(xs)
    }

    /// The weighted routed output of layer `layer` for rows `xs: [n, hidden]`: row `i` of the
    /// result is Σ_(e, w) ∈ routes[i] w · expert_e(xs[i]) (the sum in transformers'
    /// `Qwen2MoeSparseMoeBlock.forward`, without the shared expert). Rows are grouped by
    /// expert so each expert runs one matmul over all its rows; experts are visited in
    /// ascending order. Returns `[n, hidden]` in `xs`' dtype.
    pub fn forward_routed(&self, layer: usize, xs: &Tensor, routes: &[RowRoutes]) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        if h != self.hidden_size || routes.len() != n {
            return Err(ModelError::InvalidInput(format!(
                "routed rows [{n}, {h}] with {} routes for hidden size {}",
                routes.len(),
                self.hidden_size
            )));
        }
        let mut groups: BTreeMap<usize, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
        for (row, r) in routes.iter().enumerate() {
            for &(expert, w) in r {
                let g = groups.entry(expert).or_default();
                g.0.push(row as u32);
                g.1.push(w);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (expert, (rows, weights)) in groups {
            let id = ExpertId { layer, expert };
            let idx = Tensor::new(rows.as_slice(), xs.device())?;
            let x = xs.index_select(&idx, 0)?;
            let y = self.forward(id, &x)?;
            let w = Tensor::new(weights.as_slice(), xs.device())?
                .reshape((rows.len(), 1))?
                .to_dtype(xs.dtype())?;
            ys = ys.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(ys)
    }
}

//! Routed experts: the execution plane's math.
//!
//! An expert is Qwen2-MoE's SwiGLU FFN, `down(silu(gate(x)) * up(x))`
//! (transformers' `Qwen2MoeMLP`). An [`ExpertSet`] holds any subset of the routed experts of
//! one or several layers — one expert, a function of g experts, a whole layer — and loads
//! only those tensors, so its resident memory is proportional to the experts it holds.

use std::collections::BTreeMap;

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::linear::{with_f32, Linear};

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

/// A SwiGLU feed-forward block (routed expert, shared expert or dense MLP):
/// `down(silu(gate(x)) * up(x))`, with gate and up stacked into one `[2·intermediate, hidden]`
/// weight so that one kernel pass reads both, and down `[hidden, intermediate]`; weights in
/// their stored dtype, math in f32.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate_up: Linear,
    down_proj: Linear,
    intermediate: usize,
}

/// SiLU as candle computes it (`v / (1 + exp(-v))`), so the split model and the
/// candle-transformers baseline share the formula.
#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

impl SwiGlu {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` with gate/up `[intermediate, hidden]` and
    /// down `[hidden, intermediate]`.
    pub fn load(
        ckpt: &mut Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let gate = format!("{prefix}.gate_proj.weight");
        let up = format!("{prefix}.up_proj.weight");
        let gate_up =
            ckpt.load_weight_rows(&[&gate, &up], &[intermediate, intermediate], hidden)?;
        let down = ckpt.load_weight(&format!("{prefix}.down_proj.weight"), hidden, intermediate)?;
        Ok(Self {
            gate_up: Linear::new(Arc::new(gate_up), None)?,
            down_proj: Linear::new(Arc::new(down), None)?,
            intermediate,
        })
    }

    /// Hidden size (input and output features).
    pub fn hidden_size(&self) -> usize {
        self.gate_up.in_features()
    }

    /// `x: [m, hidden]` f32 row-major → `[m, hidden]`.
    pub fn forward_f32(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let i = self.intermediate;
        let gu = self.gate_up.forward_vec(x, m)?;
        let mut act = vec![0f32; m * i];
        for (a, g) in act
            .chunks_exact_mut(i.max(1))
            .zip(gu.chunks_exact((2 * i).max(1)))
        {
            let (gate, up) = g.split_at(i);
            for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                *a = silu(g) * u;
            }
        }
        self.down_proj.forward_vec(&act, m)
    }

    /// `xs: [n, hidden]` → `[n, hidden]` f32.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        if h != self.hidden_size() {
            return Err(ModelError::InvalidInput(format!(
                "rows [{n}, {h}] for hidden size {}",
                self.hidden_size()
            )));
        }
        let y = with_f32(xs, |x| self.forward_f32(x, n))?;
        Ok(Tensor::from_vec(y, (n, h), &Device::Cpu)?)
    }

    /// Bytes held by the three weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down_proj.weight_bytes()
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
            let layer: usize = layer
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: bad layer `{layer}`"))?;
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
                experts
                    .split(',')
                    .map(|x| x.trim().parse().map_err(|_| bad(x)))
                    .collect::<std::result::Result<_, _>>()?
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
        Self(
            experts
                .into_iter()
                .map(|expert| ExpertId { layer, expert })
                .collect(),
        )
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
            if id.layer >= cfg.num_hidden_layers
                || !cfg.is_moe_layer(id.layer)
                || id.expert >= cfg.num_experts
            {
                return Err(ModelError::UnknownExpert {
                    layer: id.layer,
                    expert: id.expert,
                });
            }
            let mlp = SwiGlu::load(
                ckpt,
                &expert_prefix(id),
                cfg.hidden_size,
                cfg.moe_intermediate_size,
            )?;
            experts.insert(id, mlp);
        }
        ckpt.release_files();
        Ok(Self {
            hidden_size: cfg.hidden_size,
            experts,
        })
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
        let mlp = self.experts.get(&id).ok_or(ModelError::UnknownExpert {
            layer: id.layer,
            expert: id.expert,
        })?;
        mlp.forward(xs)
    }

    /// The weighted routed output of layer `layer` for rows `xs: [n, hidden]`: row `i` of the
    /// result is Σ_(e, w) ∈ routes[i] w · expert_e(xs[i]) (the sum in transformers'
    /// `Qwen2MoeSparseMoeBlock.forward`, without the shared expert). Rows are grouped by
    /// expert so each expert runs one kernel pass over all its rows; experts are visited in
    /// ascending order and each row's sum starts at 0 and adds `w · y` in that order, so a
    /// row's result does not depend on the other rows. Returns `[n, hidden]` f32.
    pub fn forward_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &[RowRoutes],
    ) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        if h != self.hidden_size || routes.len() != n {
            return Err(ModelError::InvalidInput(format!(
                "routed rows [{n}, {h}] with {} routes for hidden size {}",
                routes.len(),
                self.hidden_size
            )));
        }
        let ys = with_f32(xs, |x| self.forward_routed_f32(layer, x, routes))?;
        Ok(Tensor::from_vec(ys, (n, h), &Device::Cpu)?)
    }

    /// [`ExpertSet::forward_routed`] on f32 rows `x: [routes.len(), hidden]` row-major.
    pub fn forward_routed_f32(
        &self,
        layer: usize,
        x: &[f32],
        routes: &[RowRoutes],
    ) -> Result<Vec<f32>> {
        let (n, h) = (routes.len(), self.hidden_size);
        if x.len() != n * h {
            return Err(ModelError::InvalidInput(format!(
                "{} values for {n} routed rows of {h}",
                x.len()
            )));
        }
        let mut groups: BTreeMap<usize, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        for (row, r) in routes.iter().enumerate() {
            for &(expert, w) in r {
                let g = groups.entry(expert).or_default();
                g.0.push(row);
                g.1.push(w);
            }
        }
        let mut ys = vec![0f32; n * h];
        let mut rows_in = Vec::new();
        for (expert, (rows, weights)) in groups {
            let mlp = self
                .experts
                .get(&ExpertId { layer, expert })
                .ok_or(ModelError::UnknownExpert { layer, expert })?;
            rows_in.clear();
            for &r in &rows {
                rows_in.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            let y = mlp.forward_f32(&rows_in, rows.len())?;
            for ((&r, &w), yr) in rows.iter().zip(&weights).zip(y.chunks_exact(h.max(1))) {
                for (o, &v) in ys[r * h..(r + 1) * h].iter_mut().zip(yr) {
                    *o += v * w;
                }
            }
        }
        Ok(ys)
    }
}

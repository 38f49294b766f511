//! One function's computation: validated expert requests in, replies out.
//!
//! Requests that arrive together — from any controller and tenant — are computed as one
//! batch: all their rows for a layer are stacked and every expert runs one matmul over all
//! rows routed to it ([`ExpertSet::forward_routed`]). Each request then gets its own rows.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use faasmoe_model::{ExpertId, ExpertSet, RowRoutes};
use faasmoe_proto::expert::{ExpertRequest, RowRoutes as WireRoutes};
use faasmoe_proto::tensor::WireTensor;
use faasmoe_proto::{ErrorCode, WireError};

/// One layer's share of a batch: the stacked rows (`[n, hidden]` f32), their routes, and
/// per request (its index in the batch, first row, rows).
type LayerRows = (Vec<f32>, Vec<RowRoutes>, Vec<(usize, usize, usize)>);

/// The experts of this function and the checks every request must pass.
#[derive(Debug)]
pub struct Function {
    experts: ExpertSet,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
}

impl Function {
    /// Wraps the loaded experts.
    pub fn new(experts: ExpertSet, max_request_bytes: usize) -> Self {
        Self {
            experts,
            max_request_bytes,
        }
    }

    /// The experts held.
    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    /// Checks a decoded request against this function: shapes and dtypes
    /// (`WrongShape`), the layer (`WrongLayer`) and every expert (`UnknownExpert`).
    pub fn check(&self, req: &ExpertRequest) -> Result<(), WireError> {
        req.validate(self.experts.hidden_size())?;
        if !self.experts.ids().any(|id| id.layer == req.layer as usize) {
            return Err(WireError::new(
                ErrorCode::WrongLayer,
                format!("this function holds no expert of layer {}", req.layer),
            ));
        }
        for r in &req.routes {
            for &e in &r.experts {
                let id = ExpertId {
                    layer: req.layer as usize,
                    expert: e as usize,
                };
                if !self.experts.contains(id) {
                    return Err(WireError::new(
                        ErrorCode::UnknownExpert,
                        format!("expert {e} of layer {} is not in this function", req.layer),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Computes a batch of checked requests. Returns one output per request, in order:
    /// `[n_rows, hidden]` weighted sums when `combine`, else `[Σ pairs, hidden]` unweighted
    /// outputs per (row, expert) pair in order of appearance; encoded in `reply_dtype`.
    pub fn compute(&self, batch: &[&ExpertRequest]) -> Result<Vec<WireTensor>, WireError> {
        let internal =
            |e: &dyn std::fmt::Display| WireError::new(ErrorCode::Internal, e.to_string());
        let h = self.experts.hidden_size();
        // Per layer: stacked rows, their routes, and for each request its row range.
        let mut by_layer: BTreeMap<u32, LayerRows> = BTreeMap::new();
        for (i, req) in batch.iter().enumerate() {
            let data = req.hidden.to_f32_vec().map_err(WireError::from)?;
            let (rows, stacked_routes, ranges) = by_layer.entry(req.layer).or_default();
            let start = stacked_routes.len();
            push_rows(rows, stacked_routes, &data, h, &req.routes, req.combine);
            ranges.push((i, start, stacked_routes.len() - start));
        }
        let mut outputs: Vec<Option<WireTensor>> = vec![None; batch.len()];
        for (layer, (rows, routes, ranges)) in by_layer {
            let n = routes.len();
            let xs = Tensor::from_vec(rows, (n, h), &Device::Cpu).map_err(|e| internal(&e))?;
            let ys = self
                .experts
                .forward_routed(layer as usize, &xs, &routes)
                .map_err(|e| internal(&e))?;
            for (i, start, len) in ranges {
                let part: Vec<f32> = ys
                    .narrow(0, start, len)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| internal(&e))?;
                let out =
                    WireTensor::from_f32(vec![len as u32, h as u32], &part, batch[i].reply_dtype)
                        .map_err(WireError::from)?;
                outputs[i] = Some(out);
            }
        }
        Ok(outputs
            .into_iter()
            .map(|o| o.expect("every request belongs to a layer"))
            .collect())
    }
}

/// Appends a request's rows: with `combine`, each row once with its weighted routes;
/// without, one row per (row, expert) pair routed with weight 1 (exact: `y · 1.0 = y`).
fn push_rows(
    rows: &mut Vec<f32>,
    routes: &mut Vec<RowRoutes>,
    data: &[f32],
    h: usize,
    wire: &[WireRoutes],
    combine: bool,
) {
    for (r, route) in wire.iter().enumerate() {
        let row = &data[r * h..(r + 1) * h];
        if combine {
            rows.extend_from_slice(row);
            routes.push(
                route
                    .experts
                    .iter()
                    .zip(&route.weights)
                    .map(|(&e, &w)| (e as usize, w))
                    .collect(),
            );
        } else {
            for &e in &route.experts {
                rows.extend_from_slice(row);
                routes.push(vec![(e as usize, 1.0)]);
            }
        }
    }
}

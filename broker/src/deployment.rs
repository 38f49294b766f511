//! What the broker deploys: one model's routed experts cut into functions at one granularity,
//! with the instance policy (idle timeout, caps, pre-warming) and how workers are started.
//! Read from command-line flags or a JSON file.

use std::path::{Path, PathBuf};

use faasmoe_proto::layout::Layout;
use faasmoe_proto::subject;
use serde::{Deserialize, Serialize};

/// Why a deployment is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    /// The deployment file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The deployment file is not valid JSON for [`Deployment`].
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The checkpoint's `config.json` could not be read.
    #[error("checkpoint config in {dir}: {message}")]
    Checkpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The model crate's error.
        message: String,
    },
    /// A field is out of range.
    #[error("invalid deployment: {0}")]
    Invalid(String),
}

/// One model's deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Checkpoint directory (config.json + safetensors), passed to every worker.
    pub model_dir: PathBuf,
    /// Model id used in subjects; default: the directory name, sanitised (as the worker does).
    #[serde(default)]
    pub model_id: Option<String>,
    /// Experts per function.
    #[serde(default = "default_granularity")]
    pub granularity: u32,
    /// Workers exit after this many ms without a request (scale to zero); 0: never.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Most instances alive (starting or ready) per function.
    #[serde(default = "default_max_instances")]
    pub max_instances_per_function: u32,
    /// Instances started per function when the broker starts (pre-warming); 0: none.
    #[serde(default)]
    pub min_instances: u32,
    /// How long an instance may take from spawn to ready before it is killed.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// The `faasmoe-expert-worker` binary; default: next to the broker's own executable, else `PATH`.
    #[serde(default)]
    pub worker_bin: Option<PathBuf>,
    /// NATS URL the workers connect to; default: the broker's own. (`nats_url` is accepted
    /// as its old name.)
    #[serde(default, alias = "nats_url")]
    pub worker_nats_url: Option<String>,
    /// NATS user of the workers.
    #[serde(default)]
    pub worker_user: Option<String>,
    /// NATS password of the workers.
    #[serde(default)]
    pub worker_password: Option<String>,
}

fn default_granularity() -> u32 {
    1
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}
fn default_max_instances() -> u32 {
    1
}
fn default_ready_timeout_ms() -> u64 {
    60_000
}

impl Deployment {
    /// A deployment of `model_dir` with defaults for everything else.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            model_id: None,
            granularity: default_granularity(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_instances_per_function: default_max_instances(),
            min_instances: 0,
            ready_timeout_ms: default_ready_timeout_ms(),
            worker_bin: None,
            worker_nats_url: None,
            worker_user: None,
            worker_password: None,
        }
    }

    /// Reads a JSON deployment file (fields as in this struct; unknown fields are rejected).
    pub fn from_file(path: &Path) -> Result<Self, DeploymentError> {
        let text = std::fs::read_to_string(path).map_err(|source| DeploymentError::Io {
            path: path.into(),
            source,
        })?;
        let d: Self = serde_json::from_str(&text).map_err(|source| DeploymentError::Parse {
            path: path.into(),
            source,
        })?;
        d.validate()?;
        Ok(d)
    }

    /// Checks ranges and the model id.
    pub fn validate(&self) -> Result<(), DeploymentError> {
        if self.granularity == 0 {
            return Err(DeploymentError::Invalid(
                "granularity must be at least 1".into(),
            ));
        }
        if self.max_instances_per_function == 0 {
            return Err(DeploymentError::Invalid(
                "max_instances_per_function must be at least 1".into(),
            ));
        }
        if self.min_instances > self.max_instances_per_function {
            return Err(DeploymentError::Invalid(format!(
                "min_instances {} exceeds max_instances_per_function {}",
                self.min_instances, self.max_instances_per_function
            )));
        }
        subject::validate_token("model", &self.model_id())
            .map_err(|e| DeploymentError::Invalid(e.to_string()))
    }

    /// The model id for subjects: `model_id`, else [`subject::model_id_for_dir`] (as the
    /// controller and the workers derive it).
    pub fn model_id(&self) -> String {
        match &self.model_id {
            Some(m) => m.clone(),
            None => subject::model_id_for_dir(&self.model_dir),
        }
    }

    /// The functions: every MoE layer of the checkpoint cut at `granularity`.
    pub fn layout(&self) -> Result<Layout, DeploymentError> {
        let cfg = faasmoe_model::Config::from_dir(&self.model_dir).map_err(|e| {
            DeploymentError::Checkpoint {
                dir: self.model_dir.clone(),
                message: e.to_string(),
            }
        })?;
        let layers: Vec<u32> = cfg.moe_layers().map(|l| l as u32).collect();
        if layers.is_empty() || cfg.num_experts == 0 {
            return Err(DeploymentError::Checkpoint {
                dir: self.model_dir.clone(),
                message: "the model has no MoE layers".into(),
            });
        }
        Ok(Layout::new(
            &layers,
            cfg.num_experts as u32,
            self.granularity,
        ))
    }

    /// The worker binary: `worker_bin`, else `faasmoe-expert-worker` next to the current
    /// executable (or its parent, for test executables in `deps/`), else on `PATH`.
    pub fn worker_bin(&self) -> PathBuf {
        if let Some(b) = &self.worker_bin {
            return b.clone();
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1).take(2) {
                let c = dir.join("faasmoe-expert-worker");
                if c.is_file() {
                    return c;
                }
            }
        }
        PathBuf::from("faasmoe-expert-worker")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_file_fills_defaults_and_rejects_bad_ranges() {
        let d: Deployment =
            serde_json::from_str(r#"{"model_dir": "/m/Qwen1.5-MoE-A2.7B", "granularity": 4}"#)
                .unwrap();
        assert_eq!(d.granularity, 4);
        assert_eq!(d.max_instances_per_function, 1);
        assert_eq!(d.model_id(), "qwen1-5-moe-a2-7b");
        d.validate().unwrap();
        let mut bad = d.clone();
        bad.min_instances = 2;
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<Deployment>(r#"{"model_dir": "x", "typo": 1}"#).is_err());
    }
}

//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, read tensor by tensor.
//!
//! Only the files that hold a requested tensor are mapped, and a loaded tensor is a copy in
//! the compute dtype: once a [`Checkpoint`] is dropped, the process keeps only what it
//! loaded (resident memory proportional to the tensors taken, not to the files).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Metadata;

use crate::config::Config;
use crate::error::{ModelError, Result};

/// The name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A checkpoint directory: its config and where each tensor lives.
pub struct Checkpoint {
    dir: PathBuf,
    config: Config,
    /// tensor name → file (absolute path).
    weight_map: HashMap<String, PathBuf>,
    files: HashMap<PathBuf, MappedFile>,
    dtype: DType,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.weight_map.len())
            .field("mapped_files", &self.files.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: checkpoints are read-only inputs; a file changed underneath us while mapped is
    // outside what we support (the same contract as candle's and safetensors' own mmap loaders).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        ModelError::Safetensors {
            path: path.to_path_buf(),
            message: format!("{e:?} (truncated or not a safetensors file?)"),
        }
    })?;
    Ok(MappedFile {
        mmap,
        header_len,
        metadata,
    })
}

impl Checkpoint {
    /// Opens `dir` (its `config.json` and safetensors files) for loading in compute dtype
    /// `dtype` (F32 on CPU; BF16/F16 allowed).
    ///
    /// Errors: missing or invalid `config.json`, no safetensors file, malformed index,
    /// malformed or truncated single file.
    pub fn open(dir: &Path, dtype: DType) -> Result<Self> {
        let config = Config::from_dir(dir)?;
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut files = HashMap::new();
        let weight_map = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Index {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Index {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut out = HashMap::with_capacity(map.len());
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Index {
                    path: index.clone(),
                    message: format!("`{name}` maps to a non-string"),
                })?;
                out.insert(name.clone(), dir.join(file));
            }
            out
        } else if single.exists() {
            let mapped = map_file(&single)?;
            let names: Vec<String> = mapped.metadata.tensors().keys().cloned().collect();
            files.insert(single.clone(), mapped);
            names.into_iter().map(|n| (n, single.clone())).collect()
        } else {
            return Err(ModelError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} nor {INDEX_FILE}"),
                ),
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weight_map,
            files,
            dtype,
        })
    }

    /// The checkpoint's validated config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The compute dtype tensors are converted to on load.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint lists tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    /// The distinct files that hold the given tensors (for sizing what a load touches).
    pub fn files_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeSet<PathBuf> {
        names
            .into_iter()
            .filter_map(|n| self.weight_map.get(n).cloned())
            .collect()
    }

    /// Loads tensor `name`, checks it has shape `shape`, converts it to the compute dtype.
    ///
    /// Errors: [`ModelError::MissingTensor`], [`ModelError::WrongShape`] and
    /// [`ModelError::UnsupportedDType`] name the tensor and file.
    pub fn load(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let path = self
            .weight_map
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?
            .clone();
        if !self.files.contains_key(&path) {
            let mapped = map_file(&path)?;
            self.files.insert(path.clone(), mapped);
        }
        let file = &self.files[&path];
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: path.clone(),
            })?;
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                path,
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let dtype = match info.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: name.to_string(),
                    path,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let start = 8 + file.header_len + info.data_offsets.0;
        let end = 8 + file.header_len + info.data_offsets.1;
        let bytes = &file.mmap[start..end];
        let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?;
        Ok(if dtype == self.dtype {
            t
        } else {
            t.to_dtype(self.dtype)?
        })
    }

    /// Unmaps every file opened so far (their pages leave the process's resident set).
    pub fn release_files(&mut self) {
        self.files.clear();
    }
}

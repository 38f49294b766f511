//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, read tensor by tensor.
//!
//! Only the files that hold a requested tensor are mapped, and a loaded tensor is a copy:
//! matmul weights in their stored dtype ([`Checkpoint::load_weight`]: bf16 stays bf16), the
//! small rest (norms, biases) in the f32 compute dtype. Once a [`Checkpoint`] is dropped, the
//! process keeps only what it loaded (resident memory ≈ the bytes of the tensors taken).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Metadata;

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::linear::Weight;

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
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: format!("{e:?} (truncated or not a safetensors file?)"),
        })?;
    Ok(MappedFile {
        mmap,
        header_len,
        metadata,
    })
}

/// The `weight_map` of `<dir>/model.safetensors.index.json` (the sharded hub layout): tensor
/// name → shard path (joined to `dir`).
///
/// Errors: [`ModelError::Io`] reading the index, [`ModelError::Index`] when it is not JSON,
/// has no `weight_map` object, or maps a name to a non-string.
pub(crate) fn index_weight_map(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let bad = |message: String| ModelError::Index {
        path: index.clone(),
        message,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(name, file)| {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`{name}` maps to a non-string")))?;
            Ok((name.clone(), dir.join(file)))
        })
        .collect()
}

impl Checkpoint {
    /// Opens `dir` (its `config.json` and safetensors files). `dtype` is the compute dtype of
    /// activations, norms and biases: F32 (the kernel takes f32 activations). Matmul weights
    /// keep their stored dtype whatever it is ([`Checkpoint::load_weight`]).
    ///
    /// Errors: a compute dtype other than F32, missing or invalid `config.json`, no
    /// safetensors file, malformed index, malformed or truncated single file.
    pub fn open(dir: &Path, dtype: DType) -> Result<Self> {
        if dtype != DType::F32 {
            return Err(ModelError::InvalidInput(format!(
                "compute dtype {dtype:?}: activations are f32 (weights stay in their stored dtype)"
            )));
        }
        let config = Config::from_dir(dir)?;
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut files = HashMap::new();
        let weight_map = if index.exists() {
            index_weight_map(dir)?
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

    /// The compute dtype that [`Checkpoint::load`] converts to (f32).
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

    /// Maps the file of tensor `name` if needed and checks its shape and stored dtype;
    /// returns the file, the stored dtype and the byte range of the data in the mapping.
    fn locate(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<(PathBuf, DType, std::ops::Range<usize>)> {
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
        if end > file.mmap.len() {
            return Err(ModelError::Safetensors {
                path,
                message: format!("tensor `{name}` ends past the end of the file"),
            });
        }
        Ok((path, dtype, start..end))
    }

    /// Loads tensor `name`, checks it has shape `shape`, converts it to the compute dtype
    /// (f32). For norms, biases and anything else that is not a per-token matmul weight;
    /// those are [`Checkpoint::load_weight`].
    ///
    /// Errors: [`ModelError::MissingTensor`], [`ModelError::WrongShape`] and
    /// [`ModelError::UnsupportedDType`] name the tensor and file.
    pub fn load(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (path, dtype, range) = self.locate(name, shape)?;
        let bytes = &self.files[&path].mmap[range];
        let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?;
        Ok(if dtype == self.dtype {
            t
        } else {
            t.to_dtype(self.dtype)?
        })
    }

    /// Loads matmul weight `name` of shape `[rows, cols]` in its stored dtype (bf16, f16 or
    /// f32): one copy out of the mapping, no conversion.
    ///
    /// Errors: as [`Checkpoint::load`].
    pub fn load_weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        self.load_weight_rows(&[name], &[rows], cols)
    }

    /// Loads matmul weights `names[i]` of shapes `[rows[i], cols]` stacked by rows into one
    /// `[Σ rows, cols]` weight (e.g. an MLP's gate and up projections, read in one kernel
    /// pass). They keep their stored dtype when they share one; a mix is widened to f32.
    ///
    /// Errors: as [`Checkpoint::load`].
    pub fn load_weight_rows(
        &mut self,
        names: &[&str],
        rows: &[usize],
        cols: usize,
    ) -> Result<Weight> {
        if names.len() != rows.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} weight names for {} row counts",
                names.len(),
                rows.len()
            )));
        }
        let mut parts = Vec::with_capacity(names.len());
        for (name, &r) in names.iter().zip(rows) {
            parts.push((r, self.locate(name, &[r, cols])?));
        }
        let first = parts.first().map(|p| p.1 .1).unwrap_or(DType::F32);
        if parts.iter().all(|p| p.1 .1 == first) {
            let slices: Vec<(usize, &[u8])> = parts
                .iter()
                .map(|(r, (path, _, range))| (*r, &self.files[path].mmap[range.clone()]))
                .collect();
            return Weight::from_le_parts(first, cols, &slices);
        }
        let mut widened = Vec::with_capacity(parts.len());
        for (r, (path, dtype, range)) in &parts {
            let t = Tensor::from_raw_buffer(
                &self.files[path].mmap[range.clone()],
                *dtype,
                &[*r, cols],
                &Device::Cpu,
            )?;
            let v: Vec<u8> = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            widened.push((*r, v));
        }
        let slices: Vec<(usize, &[u8])> = widened.iter().map(|(r, v)| (*r, v.as_slice())).collect();
        Weight::from_le_parts(DType::F32, cols, &slices)
    }

    /// Unmaps every file opened so far (their pages leave the process's resident set).
    pub fn release_files(&mut self) {
        self.files.clear();
    }
}

//! The expert section: one function's cold start and resident memory on the real A2.7B
//! layer geometry (the generated expert checkpoint).

use super::*;

/// Single-expert function cold start and memory with one checkpoint.
#[derive(Debug, Clone)]
pub(super) struct ExpertRow {
    pub(super) experts: u32,
    pub(super) repeat: usize,
    pub(super) ready_ms: f64,
    pub(super) rss: u64,
    pub(super) pss: u64,
}

pub(super) async fn expert_bench(
    model: &Path,
    sets: &[u32],
    repeats: usize,
    log_dir: &Path,
) -> anyhow::Result<Vec<ExpertRow>> {
    let credentials = InternalCredentials::generate();
    let (server, _) = start_server(log_dir, &credentials)?;
    let url = server.url().to_string();
    let mut rows = Vec::new();
    for &k in sets {
        let reps = if k == 1 { repeats } else { repeats.min(3) };
        for rep in 0..reps {
            let t0 = Instant::now();
            let mut child = Command::new(sibling("faasmoe-expert-worker")?)
                .args(["--nats-url", &url, "--nats-user", "worker"])
                .env("NATS_PASSWORD", &credentials.worker)
                .arg("--model-dir")
                .arg(model)
                .args([
                    "--experts",
                    &format!("0:0-{}", k - 1),
                    "--idle-timeout-ms",
                    "0",
                ])
                .stdout(Stdio::piped())
                .stderr(log_file(log_dir, &format!("worker-{k}-{rep}.log"))?)
                .kill_on_drop(true)
                .spawn()
                .context("spawning faasmoe-expert-worker")?;
            let mut lines =
                tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
            let ready = tokio::time::timeout(Duration::from_secs(300), async {
                while let Some(l) = lines.next_line().await? {
                    if l.starts_with("READY") {
                        return anyhow::Ok(true);
                    }
                }
                anyhow::Ok(false)
            })
            .await;
            let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
            if !matches!(ready, Ok(Ok(true))) {
                let _ = child.kill().await;
                bail!(
                    "expert worker with {k} experts did not get ready (see {})",
                    log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let pid = child.id().unwrap_or(0) as i32;
            let (mut rss, mut pss) = (0, 0);
            if let Ok(p) = procfs::process::Process::new(pid) {
                rss = p.stat().map(|s| s.rss * page_size()).unwrap_or(0);
                if let Ok(r) = p.smaps_rollup() {
                    pss = r
                        .memory_map_rollup
                        .0
                        .first()
                        .and_then(|m| m.extension.map.get("Pss").copied())
                        .unwrap_or(0);
                }
            }
            crate::stack::terminate(&mut child).await;
            println!("    {k} expert(s), repeat {}: spawn → READY {ready_ms:.0} ms, RSS {:.1} MB, PSS {:.1} MB", rep + 1, mbf(rss as f64), mbf(pss as f64));
            rows.push(ExpertRow {
                experts: k,
                repeat: rep,
                ready_ms,
                rss,
                pss,
            });
        }
    }
    server.stop();
    Ok(rows)
}

pub(super) fn ensure_expert_model(a: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = &a.expert_model {
        return Ok(m.clone());
    }
    let dir = PathBuf::from("demo-data/qwen15-moe-a2.7b-l1-v1024");
    if dir.join("config.json").exists() && dir.join("model.safetensors.index.json").exists()
        || dir.join("model.safetensors").exists()
    {
        return Ok(dir);
    }
    println!("creating {}: the exact Qwen1.5-MoE-A2.7B layer geometry, 1 layer, vocab 1024, random weights", dir.display());
    faasmoe_model::random_checkpoint::init(&faasmoe_model::random_checkpoint::InitArgs {
        layers: Some(1),
        vocab_size: Some(1024),
        ..faasmoe_model::random_checkpoint::InitArgs::new(&dir, "qwen1.5-moe-a2.7b")
    })?;
    Ok(dir)
}

pub(super) fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.path().extension().is_some_and(|x| x == "safetensors")
                        && !e.file_name().to_string_lossy().starts_with("golden")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

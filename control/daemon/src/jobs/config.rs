//! The runner's flags and what they resolve to.

use std::path::PathBuf;

/// Job runner flags of `flynn-host daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct JobsArgs {
    /// Run no jobs on this host.
    #[arg(long)]
    pub no_jobs: bool,
    /// Where job output is written, one file per app.
    #[arg(long, default_value = "/var/log/flynn")]
    pub log_dir: PathBuf,
    /// Size at which an app's log file rotates (K, M, G suffixes).
    #[arg(long, default_value = "100M")]
    pub log_max_size: String,
    /// Ports of this host given as `$PORT` to jobs in the host's network (FIRST-LAST).
    #[arg(long, default_value = "49152-59999")]
    pub job_ports: String,
    /// Job networking: `routed` (an address of its own per job, on this host's subnet,
    /// other hosts' subnets routed via their addresses: every host on one network),
    /// `vxlan` (the same addresses, other hosts reached through a VXLAN overlay: hosts in
    /// different subnets), `host` (the host's network), `auto` (own addresses if this host
    /// can give them, each other host by route where it is on this host's network and by
    /// VXLAN where not; else the host's network, saying so).
    #[arg(long, default_value = "auto", value_parser = ["auto", "routed", "vxlan", "host"])]
    pub job_network: String,
    /// Memory the scheduler may reserve for jobs on this host (the sum of their process
    /// types' memory limits): a size, or `auto` for the host's total memory.
    #[arg(long, default_value = "auto")]
    pub job_memory: String,
    /// CPU the scheduler may reserve for jobs on this host (the sum of their process types'
    /// `cpu` limits): millicores (`1500`, `1500m`), cores (`2cores`), or `auto` for every
    /// core the host has.
    #[arg(long, default_value = "auto")]
    pub job_cpu: String,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub layers_dir: PathBuf,
    pub jobs_dir: PathBuf,
    pub ports: std::ops::RangeInclusive<u16>,
    pub network: String,
    /// Bytes of job memory limits this host takes (see `--job-memory`).
    pub memory: u64,
    /// Millicores of job CPU reservations this host takes (see `--job-cpu`).
    pub cpu_millis: u64,
}

/// The host's total memory, from /proc/meminfo.
fn total_memory() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no MemTotal in /proc/meminfo"))?;
    Ok(kib * 1024)
}

impl JobsArgs {
    pub fn validate(&self, data_dir: &std::path::Path) -> anyhow::Result<Option<JobsConfig>> {
        if self.no_jobs {
            return Ok(None);
        }
        let log_max_bytes = crate::components::volumes::parse_size(&self.log_max_size)
            .map_err(|e| anyhow::anyhow!("--log-max-size: {e}"))?;
        anyhow::ensure!(log_max_bytes >= 1024, "--log-max-size must be at least 1K");
        let ports = self
            .job_ports
            .split_once('-')
            .and_then(|(a, b)| Some(a.trim().parse::<u16>().ok()?..=b.trim().parse::<u16>().ok()?))
            .filter(|r| !r.is_empty() && *r.start() > 0)
            .ok_or_else(|| anyhow::anyhow!("--job-ports {:?} is not FIRST-LAST", self.job_ports))?;
        let memory = match self.job_memory.as_str() {
            "auto" => total_memory()?,
            size => crate::components::volumes::parse_size(size)
                .map_err(|e| anyhow::anyhow!("--job-memory: {e}"))?,
        };
        let cpu_millis = match self.job_cpu.as_str() {
            "auto" => {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as u64
                    * 1000
            }
            cpu => flynn_state::parse_cpu(cpu).map_err(|e| anyhow::anyhow!("--job-cpu: {e}"))?,
        };
        Ok(Some(JobsConfig {
            memory,
            cpu_millis,
            log_dir: self.log_dir.clone(),
            log_max_bytes,
            layers_dir: data_dir.join("images").join("layers"),
            jobs_dir: data_dir.join("jobs"),
            ports,
            network: self.job_network.clone(),
        }))
    }
}

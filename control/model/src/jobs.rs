//! Images, releases, formations and jobs: what the scheduler and the hosts' job runners
//! agree on through the state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Blobstore path of an image layer, by the SHA-512 of its bytes as stored (compressed).
pub fn layer_path(sha512: &str) -> String {
    format!("/layers/{sha512}")
}

/// How a layer's tar stream is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// SHA-512 (hex) of the layer as stored: the blobstore path and the check on unpack.
    pub sha512: String,
    pub size: u64,
    pub compression: LayerCompression,
}

/// What an image says about running it (the OCI config's subset Flynn uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries, as images carry them.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    /// `uid[:gid]` or a name in the image's /etc/passwd; empty runs as `nobody`.
    #[serde(default)]
    pub user: String,
}

/// An image: layers bottom first, and its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
}

/// A size as operators write it: `1048576`, `512M`, `512MB`, `10G`, `1t` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" => 1 << 10,
        "M" | "MB" => 1 << 20,
        "G" | "GB" => 1 << 30,
        "T" | "TB" => 1 << 40,
        _ => return Err(format!("size {s:?}: the unit must be K, M, G or T")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number of bytes"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A CPU amount in millicores: `500m`, `1500` (millicores, Flynn's unit), or `0.5` /
/// `2` with a unit of cores (`2cores`, `0.5core`).
pub fn parse_cpu(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("cpu {s:?} is not millicores (500m, 1500) or cores (0.5cores)");
    let millis = if let Some(n) = t.strip_suffix('m') {
        n.parse::<u64>().map_err(|_| bad())?
    } else if let Some(n) = t.strip_suffix("cores").or_else(|| t.strip_suffix("core")) {
        let cores: f64 = n.trim().parse().map_err(|_| bad())?;
        if !cores.is_finite() || !(0.0..=1e6).contains(&cores) {
            return Err(bad());
        }
        (cores * 1000.0).round() as u64
    } else {
        t.parse::<u64>().map_err(|_| bad())?
    };
    if millis == 0 {
        return Err(format!("cpu {s:?} must be more than nothing"));
    }
    Ok(millis)
}

/// Resource limits of a process type. `None` leaves the host's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of memory (the cgroup's hard limit).
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU reserved, in millicores (1000 = one core): the scheduler places the job only on
    /// a host with that much unreserved, and its cgroup's weight is made in proportion
    /// (Flynn's `cpu` limit), so under contention it gets at least its share.
    #[serde(default)]
    pub cpu_millis: Option<u64>,
    /// Relative CPU weight (cgroup v1 `cpu.shares`; v2 `cpu.weight` scaled from it). Without
    /// it, the weight follows `cpu_millis`.
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    /// Most processes (and threads) the job may have at once.
    #[serde(default)]
    pub max_procs: Option<u64>,
    /// Most open files (RLIMIT_NOFILE).
    #[serde(default)]
    pub max_fd: Option<u64>,
}

/// One process type of a release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessType {
    /// Arguments; empty runs the image's entrypoint and cmd.
    #[serde(default)]
    pub args: Vec<String>,
    /// Whether it serves on `$PORT` (registered in discovery as `APP-TYPE` when it does).
    #[serde(default)]
    pub ports: bool,
    /// One job on every host instead of a count.
    #[serde(default)]
    pub omni: bool,
    #[serde(default)]
    pub limits: Limits,
    /// An HTTP path that must answer 2xx/3xx before the job counts as up (else: the port
    /// accepts a connection).
    #[serde(default)]
    pub health_path: Option<String>,
    /// Run in the host's network (a host port as `$PORT`) instead of an address of its own.
    #[serde(default)]
    pub host_network: bool,
    /// Data volumes: a volume on the job's host mounted at each path. They outlive the job
    /// (recorded with it as owner) unless `delete_on_stop`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeReq>,
    /// At most one job of this type on a host (a replicated database's servers: losing a
    /// host loses one of them, and each is known by its host).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_per_host: bool,
}

/// A data volume a process type asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReq {
    /// Absolute path in the job's filesystem.
    pub path: String,
    #[serde(default)]
    pub delete_on_stop: bool,
}

/// An immutable release: an image, process types and the env they run with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// `APP-vN`.
    pub id: String,
    pub app: String,
    pub version: u64,
    pub image: Image,
    pub processes: BTreeMap<String, ProcessType>,
    /// Global env at release time.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per-process-type env overrides at release time.
    #[serde(default)]
    pub type_env: BTreeMap<String, BTreeMap<String, String>>,
    pub created_ms: u64,
}

impl Release {
    /// The env a job of `proc_type` gets from its release.
    pub fn env_for(&self, proc_type: &str) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        if let Some(t) = self.type_env.get(proc_type) {
            env.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env
    }
}

/// How many jobs of each process type an app runs, of which release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formation {
    pub app: String,
    pub release: String,
    #[serde(default)]
    pub processes: BTreeMap<String, u32>,
}

/// Where a release's rollout stands (`GET /apps/{app}/releases/{id}/rollout`): what a
/// deploy command prints while it waits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub release: String,
    pub state: RolloutState,
    /// Why it failed: the job that crashed or failed, and what it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it is not moving, while it deploys: no live host has room for a type's jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Per process type: jobs of the release running, and how many the formation asks.
    #[serde(default)]
    pub processes: BTreeMap<String, TypeRollout>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    #[default]
    Deploying,
    /// Every type runs its count, or a newer release took over.
    Done,
    Failed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeRollout {
    pub running: u32,
    pub want: u32,
    /// One job per host, not a count (`want` is 1: at least one).
    #[serde(default)]
    pub omni: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Placed on a host by the scheduler; the host has not started it yet.
    Pending,
    /// The host is preparing or starting it, or waiting for it to come up.
    Starting,
    /// Up (its port answers) and registered in discovery.
    Running,
    /// Asked to stop; the host is draining and stopping it.
    Stopping,
    /// Exited after being asked to stop, or with status 0.
    Done,
    /// Exited on its own with a non-zero status or a signal.
    Crashed,
    /// Could not be started (bad command, missing image, host down).
    Failed,
}

impl JobState {
    /// Whether the job is (or is about to be) on its host.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Pending | JobState::Starting | JobState::Running | JobState::Stopping
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub app: String,
    pub release: String,
    #[serde(rename = "type")]
    pub proc_type: String,
    /// Raft node id of the host it runs on.
    pub host: u64,
    pub state: JobState,
    /// A one-off job (`flynn run`): not part of the formation, never restarted.
    #[serde(default)]
    pub oneoff: bool,
    /// Arguments of a one-off job (else the release's).
    #[serde(default)]
    pub args: Vec<String>,
    /// A one-off job whose stdin is uploaded by its caller (else /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// A build job (`flynn deploy DIR` of a source with `bin/compile`): what it builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// A one-off job on a terminal (`flynn run` from one): its pty's first size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Env set over its release's (`flynn pg psql` runs on the postgres image with the
    /// app's resource env).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `IP:PORT` it serves on, once running.
    #[serde(default)]
    pub addr: Option<String>,
    #[serde(default)]
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    pub created_ms: u64,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

/// A terminal's size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// What a build job builds: its source (a layer holding `app/`) copied to a writable
/// `/app` in a container of `image` (the cluster's base image), where `bin/compile` runs.
/// The built `/app` becomes the slug layer of the app's next release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub image: Image,
    pub source: Layer,
}

impl Job {
    /// The discovery service its instances register under.
    pub fn service(&self) -> String {
        format!("{}-{}", self.app, self.proc_type)
    }
}

/// What `flynn docker push` / `flynn deploy` sends to make a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRelease {
    pub image: Image,
    /// Process types; `None` keeps the current release's (or makes `web` from the image).
    #[serde(default)]
    pub processes: Option<BTreeMap<String, ProcessType>>,
}

/// One line of a job's output, as hosts store it and the log API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the epoch, on the job's host.
    pub ts: u64,
    pub host: u64,
    /// Per-host sequence number: orders lines of the same millisecond.
    pub seq: u64,
    pub app: String,
    pub job: String,
    #[serde(rename = "type")]
    pub proc_type: String,
    /// `stdout`, `stderr`, or `init` (the container init's own messages).
    pub stream: String,
    pub msg: String,
    /// Where the line ends in its stream of the job's output (bytes from the job's start):
    /// a restarted daemon resumes reading a job that outlived it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off: Option<u64>,
}

/// Which lines a log request wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    pub app: String,
    #[serde(default)]
    pub job: Option<String>,
    #[serde(default, rename = "type")]
    pub proc_type: Option<String>,
    /// The last this many lines (at most [`MAX_LOG_LINES`]).
    #[serde(default)]
    pub lines: Option<usize>,
    /// Only lines after this cursor ([`LogLine::cursor`] of the last line seen).
    #[serde(default)]
    pub after: Option<String>,
}

impl LogLine {
    /// Where the line sorts cluster-wide: time, then host, then the host's sequence.
    pub fn key(&self) -> (u64, u64, u64) {
        (self.ts, self.host, self.seq)
    }

    /// The key as a resumable cursor (`ts-host-seq`).
    pub fn cursor(&self) -> String {
        format!("{}-{}-{}", self.ts, self.host, self.seq)
    }
}

impl LogQuery {
    /// The cursor as a key; `None` if absent or malformed.
    pub fn after_key(&self) -> Option<(u64, u64, u64)> {
        let mut it = self.after.as_deref()?.split('-').map(|p| p.parse().ok());
        Some((it.next()??, it.next()??, it.next()??))
    }

    /// Whether `line` is one this query asks for (the line count aside).
    pub fn matches(&self, line: &LogLine) -> bool {
        line.app == self.app
            && self.job.as_ref().is_none_or(|j| *j == line.job)
            && self.proc_type.as_ref().is_none_or(|t| *t == line.proc_type)
            && self.after_key().is_none_or(|k| line.key() > k)
    }
}

/// Most lines one log request returns.
pub const MAX_LOG_LINES: usize = 10_000;

#[cfg(test)]
mod tests {
    #[test]
    fn t10_sizes_read_as_operators_write_them() {
        let parse = super::parse_size;
        assert_eq!(parse("1048576").unwrap(), 1 << 20);
        assert_eq!(parse("10G").unwrap(), 10 << 30);
        assert_eq!(parse("512m").unwrap(), 512 << 20);
        assert_eq!(parse("256MB").unwrap(), 256 << 20);
        assert_eq!(parse("1g").unwrap(), 1 << 30);
        for bad in ["", "G", "1X", "-5", "99999999999T", "12 parsecs"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn t11_cpu_reads_as_millicores_or_cores() {
        let parse = super::parse_cpu;
        assert_eq!(parse("500m").unwrap(), 500);
        assert_eq!(parse("1500").unwrap(), 1500);
        assert_eq!(parse("2cores").unwrap(), 2000);
        assert_eq!(parse("0.25core").unwrap(), 250);
        for bad in [
            "", "m", "0", "0m", "-1", "1.5", "half", "nancores", "-1cores",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! Everything a job needs before its init starts: image layers unpacked, its directory,
//! cgroup, network and port, env, data volumes, and the container spec written.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flynn_job::cgroup::JobCgroup;
use flynn_job::init::ContainerSpec;
use flynn_job::JobDir;
use flynn_state::{ProcessType, Release};

use super::state::State;
use super::{build, network, JobError, JobRunner, RunningJob};

impl JobRunner {
    /// Layers, directories, cgroups and the init's spec; the container is not started yet.
    pub(super) async fn prepare(
        &self,
        local: &State,
        l: &RunningJob,
    ) -> Result<Prepared, JobError> {
        let job = &l.job;
        // A build runs on its own image with no process type; other jobs on their release.
        let build = job
            .build
            .as_ref()
            .map(|b| (b, local.read(|s| build::Inputs::from_state(s, &job.app))));
        let (image, proc, release_env) = match &build {
            Some((b, inputs)) => {
                let mut proc = ProcessType::default();
                proc.limits.memory = Some(inputs.memory);
                (b.image.clone(), proc, BTreeMap::new())
            }
            None => {
                let release: Release = local
                    .read(|s| s.jobs.releases.get(&job.release).cloned())
                    .ok_or_else(|| JobError::ReleaseGone(job.release.clone()))?;
                let proc = release
                    .processes
                    .get(&job.proc_type)
                    .cloned()
                    .unwrap_or_default();
                let env = release.env_for(&job.proc_type);
                (release.image, proc, env)
            }
        };
        let mut lowerdirs = Vec::new();
        for layer in &image.layers {
            lowerdirs.push(self.layer(layer).await?);
        }
        lowerdirs.reverse(); // overlayfs wants the top layer first
        let dir = JobDir::create(&self.cfg.jobs_dir, &job.id)?;
        let build_mounts = match &build {
            Some((b, inputs)) => {
                let source = self.layer(&b.source).await?;
                let job_dir = dir.dir.clone();
                let mounts =
                    tokio::task::block_in_place(|| build::prepare(&job_dir, &source, inputs))
                        .map_err(JobError::Build)?;
                if let Err(why) = self.restore_build_cache(&job.app, &job_dir).await {
                    // A cache only saves time: the build goes on without it.
                    l.tell(&format!("the build cache was not restored ({why})"));
                }
                mounts
            }
            None => Vec::new(),
        };
        let cgroup = match &self.cgroups {
            Some(h) => Some(h.create(&self.cgroup_name(&job.id), &proc.limits).map_err(
                |e| match e {
                    flynn_job::Error::Limit { .. } => JobError::Limits(e.to_string()),
                    e => JobError::Cgroup(e.to_string()),
                },
            )?),
            None => None,
        };
        let routed = self
            .net
            .get()
            .and_then(Option::as_ref)
            .filter(|_| !proc.host_network);
        if routed.is_none()
            && !proc.host_network
            && matches!(self.cfg.network.as_str(), "routed" | "vxlan")
        {
            let why = self.net_note.lock().expect("net note").clone();
            return Err(JobError::NoJobNetwork(
                why.unwrap_or_else(|| "it is not set up yet".into()),
            ));
        }
        let (port, net) = match routed {
            Some(hn) => {
                let published = (proc.ports && !job.oneoff).then_some(network::JOB_PORT);
                (
                    Some(network::JOB_PORT),
                    Some(
                        tokio::task::block_in_place(|| hn.create(&job.id, published))
                            .map_err(JobError::Network)?,
                    ),
                )
            }
            None if proc.ports || job.oneoff => {
                (Some(self.alloc_port().ok_or(JobError::NoPort)?), None)
            }
            None => (None, None),
        };
        // Env: the image's, then the release's, then the job's own, then Flynn's.
        let mut env: BTreeMap<String, String> = image
            .config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(release_env);
        env.extend(job.env.clone());
        env.entry("PATH".into()).or_insert_with(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        if job.build.is_some() {
            env.insert("HOME".into(), build::HOME.into());
        }
        env.entry("HOME".into()).or_insert_with(|| "/".into());
        if let Some(p) = port {
            env.insert("PORT".into(), p.to_string());
        }
        env.insert("FLYNN_APP_ID".into(), job.app.clone());
        env.insert("FLYNN_RELEASE_ID".into(), job.release.clone());
        env.insert("FLYNN_PROCESS_TYPE".into(), job.proc_type.clone());
        env.insert("FLYNN_JOB_ID".into(), job.id.clone());
        env.insert("EXTERNAL_IP".into(), self.ip.clone());
        env.insert("FLYNN_HOST_ID".into(), self.host.to_string());
        let config = &image.config;
        let args = if !job.args.is_empty() {
            job.args.clone()
        } else if !proc.args.is_empty() {
            proc.args.clone()
        } else {
            config
                .entrypoint
                .iter()
                .chain(&config.cmd)
                .cloned()
                .collect()
        };
        let mut volumes = self.data_volumes(local, job, &proc).await?;
        volumes.extend(build_mounts);
        let spec = ContainerSpec {
            id: job.id.clone(),
            hostname: job.id.chars().take(63).collect(),
            lowerdirs,
            upper: dir.upper(),
            work: dir.work(),
            root: dir.root(),
            args,
            env,
            cwd: if job.build.is_some() {
                "/app".into()
            } else {
                config.working_dir.clone()
            },
            user: config.user.clone(),
            cgroup_join: cgroup.as_ref().map(|c| c.join_files()).unwrap_or_default(),
            max_fd: proc.limits.max_fd,
            netns: net.as_ref().map(|n| PathBuf::from(n.netns_path())),
            volumes,
            tty: job.tty.is_some(),
            shim: super::shim::outlives_daemon(job).then(|| dir.dir.clone()),
        };
        let spec_path = dir.write_spec(&spec)?;
        let ip = net
            .as_ref()
            .map_or_else(|| self.ip.clone(), |n| n.ip.to_string());
        let prepared = Prepared {
            spec_path,
            cgroup,
            port,
            ip,
            net,
            health_path: proc.health_path.clone(),
            register: proc.ports && !job.oneoff,
            shim: spec.shim.clone(),
        };
        if prepared.shim.is_some() {
            // What a restarted daemon needs to take the job up again.
            prepared
                .runtime()
                .write(&dir.dir)
                .map_err(|e| JobError::Store(format!("writing the job's runtime: {e}")))?;
        }
        Ok(prepared)
    }

    /// A layer unpacked on this host, from the blobstore.
    async fn layer(&self, layer: &flynn_state::Layer) -> Result<PathBuf, JobError> {
        if self.layers.has(&layer.sha512) {
            return Ok(self.layers.path(&layer.sha512));
        }
        let _one_at_a_time = self.unpack.lock().await;
        if self.layers.has(&layer.sha512) {
            return Ok(self.layers.path(&layer.sha512));
        }
        let blobstore = self
            .blobstore
            .as_ref()
            .ok_or(JobError::NoBlobstore(" to fetch image layers from"))?;
        let path = flynn_state::layer_path(&layer.sha512);
        let object = blobstore
            .local_copy(&path)
            .await
            .map_err(|e| JobError::FetchLayer {
                layer: layer.sha512[..16].to_string(),
                why: e.to_string(),
            })?;
        let store = self.layers.clone();
        let (sha, compression) = (layer.sha512.clone(), layer.compression);
        let short = layer.sha512[..16].to_string();
        let unpack = |why: String| JobError::UnpackLayer {
            layer: short.clone(),
            why,
        };
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&object).map_err(|e| e.to_string())?;
            store
                .ensure(&sha, compression, f)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| unpack(e.to_string()))?
        .map_err(unpack)
    }
}

pub(crate) struct Prepared {
    pub(super) spec_path: PathBuf,
    pub(super) cgroup: Option<JobCgroup>,
    pub(super) port: Option<u16>,
    /// The address the job serves on: its own, or the host's.
    pub(super) ip: String,
    pub(super) net: Option<network::JobNet>,
    pub(super) health_path: Option<String>,
    pub(super) register: bool,
    /// The job's directory, where its shim serves (a service job: see `shim`).
    pub(super) shim: Option<PathBuf>,
}

impl Prepared {
    pub(super) fn runtime(&self) -> super::shim::Runtime {
        super::shim::Runtime {
            port: self.port,
            ip: self.ip.clone(),
            net: self.net.clone(),
            health_path: self.health_path.clone(),
            register: self.register,
        }
    }
}

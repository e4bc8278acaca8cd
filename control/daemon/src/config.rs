//! `flynn-host daemon`'s flags, merged with what `flynn-host init` recorded and the
//! defaults: flags win, then the init file, then the defaults stated here.

use std::net::IpAddr;
use std::path::Path;

use crate::blobstore::BlobstoreArgs;
use crate::components::firewall::FirewallArgs;
use crate::components::router::RouterArgs;
use crate::components::volumes::VolumeArgs;
use crate::hostdir::HostDir;
use crate::jobs::JobsArgs;
use crate::{DaemonConfig, DEFAULT_PORT};

/// The address other hosts reach this one at when neither a flag nor init names one.
pub const DEFAULT_EXTERNAL_IP: &str = "127.0.0.1";

#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Address other hosts reach this one at (default: from init, else 127.0.0.1).
    #[arg(long)]
    pub external_ip: Option<String>,
    /// Host API port (default: from init, else 1113).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// Peers to ask for admission (default: from init).
    #[arg(long, value_delimiter = ',')]
    pub peer_ips: Vec<String>,
    /// Also append the daemon's log to this file (stderr keeps it too: the journal under
    /// systemd). Opened in append mode, so logrotate's copytruncate rotates it.
    #[arg(long)]
    pub log_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub firewall: FirewallArgs,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub volumes: VolumeArgs,
    #[command(flatten)]
    pub blobstore: BlobstoreArgs,
    #[command(flatten)]
    pub jobs: JobsArgs,
}

impl DaemonArgs {
    /// The daemon's config for the host in `data_dir`, checked.
    pub fn resolve(&self, data_dir: &Path) -> anyhow::Result<DaemonConfig> {
        let init = HostDir::new(data_dir).init_config()?;
        let external_ip = self
            .external_ip
            .clone()
            .or(init.external_ip)
            .unwrap_or_else(|| DEFAULT_EXTERNAL_IP.into());
        anyhow::ensure!(!external_ip.is_empty(), "--external-ip is empty");
        let port = self.port.or(init.port).unwrap_or(DEFAULT_PORT);
        anyhow::ensure!(port != 0, "--port 0 is not a port other hosts can reach");
        Ok(DaemonConfig {
            data_dir: data_dir.to_path_buf(),
            external_ip,
            port,
            listen_ip: self.listen_ip,
            peer_ips: if self.peer_ips.is_empty() {
                init.peer_ips
            } else {
                self.peer_ips.clone()
            },
            firewall: self.firewall.validate()?,
            router: self.router.validate(data_dir)?,
            volumes: self.volumes.validate(data_dir)?,
            blobstore: self.blobstore.validate(data_dir)?,
            jobs: self.jobs.validate(data_dir)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Daemon {
        #[command(flatten)]
        args: super::DaemonArgs,
    }

    /// Every component's flags flattened together must not clash (clap checks ids only in
    /// debug builds, at first parse: a clash would stop the daemon).
    #[test]
    fn t10_component_flags_do_not_clash() {
        Daemon::command().debug_assert();
        let d = Daemon::parse_from(["daemon", "--no-router", "--blobstore-http", "127.0.0.1:0"]);
        assert!(d.args.router.no_router);
    }
}

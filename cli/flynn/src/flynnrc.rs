//! `~/.flynnrc`: the clusters the `flynn` CLI knows (`flynn cluster add NAME URL KEY`, or
//! `flynn cluster add -p PIN NAME DOMAIN KEY` for a cluster's controller behind its router).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlynnRc {
    /// Name of the cluster used when `-c` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub url: String,
    pub key: String,
    /// Pin of the controller's certificate (base64 SHA-256 of its DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<String>,
    /// Address to connect to instead of resolving the URL's host (no DNS yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
}

impl Cluster {
    pub fn client(&self) -> anyhow::Result<flynn_client::ControllerClient> {
        let tls = flynn_client::Tls {
            pin: self.tls_pin.clone(),
            ip: self.ip,
        };
        flynn_client::ControllerClient::with_tls(&self.url, &self.key, &tls)
            .with_context(|| format!("cluster {:?} in flynnrc", self.name))
    }
}

/// `$FLYNNRC`, else `~/.flynnrc`.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLYNNRC") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set FLYNNRC to a file path")?;
    Ok(Path::new(&home).join(".flynnrc"))
}

/// A cluster address as given on the command line: a URL, or a bare host[:port]; with a
/// TLS pin a bare name is the cluster domain, and the controller is
/// `https://controller.DOMAIN` (as in Flynn).
pub fn normalize_url(url: &str, pinned: bool) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    if url.is_empty() {
        bail!("the cluster URL is empty");
    }
    let full = if url.contains("://") {
        url.to_string()
    } else if pinned {
        format!("https://controller.{url}")
    } else {
        format!("http://{url}")
    };
    if pinned && !full.starts_with("https://") {
        bail!("a TLS pin needs an https:// controller URL, not {full:?}");
    }
    if !(full.starts_with("http://") || full.starts_with("https://")) {
        bail!("cluster URL {url:?} must be http:// or https://");
    }
    Ok(full)
}

impl FlynnRc {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FlynnRc::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes atomically with owner-only permissions (the file holds controller keys).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = toml::to_string(self).context("encoding flynnrc")?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn add(
        &mut self,
        name: &str,
        url: &str,
        key: &str,
        tls_pin: Option<&str>,
        make_default: bool,
    ) -> anyhow::Result<()> {
        if let Some(pin) = tls_pin {
            flynn_client::pin::parse_pin(pin).map_err(anyhow::Error::msg)?;
        }
        if name.is_empty() || name.contains(char::is_whitespace) {
            bail!("cluster name {name:?} must be non-empty and without spaces");
        }
        if key.is_empty() {
            bail!("the controller key is empty");
        }
        if self.clusters.iter().any(|c| c.name == name) {
            bail!("cluster {name:?} exists already; remove it first with `flynn cluster remove {name}`");
        }
        self.clusters.push(Cluster {
            name: name.to_string(),
            url: normalize_url(url, tls_pin.is_some())?,
            key: key.to_string(),
            tls_pin: tls_pin.map(String::from),
            ip: None,
        });
        if make_default || self.default.is_none() {
            self.default = Some(name.to_string());
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> anyhow::Result<()> {
        let before = self.clusters.len();
        self.clusters.retain(|c| c.name != name);
        if self.clusters.len() == before {
            bail!("no cluster named {name:?}");
        }
        if self.default.as_deref() == Some(name) {
            self.default = self.clusters.first().map(|c| c.name.clone());
        }
        Ok(())
    }

    /// The cluster named, else the default one.
    pub fn pick(&self, name: Option<&str>) -> anyhow::Result<&Cluster> {
        let name = match name.or(self.default.as_deref()) {
            Some(n) => n,
            None if self.clusters.len() == 1 => &self.clusters[0].name,
            None => bail!("no cluster configured: run `flynn cluster add NAME URL KEY`"),
        };
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no cluster named {name:?} in flynnrc"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_pick_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rc");
        let mut rc = FlynnRc::load(&p).unwrap();
        rc.add("prod", "10.0.0.1:1113", "k1", None, false).unwrap();
        rc.add("dev", "https://dev.example.com", "k2", None, false)
            .unwrap();
        assert!(rc.add("prod", "x", "k", None, false).is_err());
        // With a pin, a bare name is the cluster domain, reached over TLS.
        let pin = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        rc.add("tls", "dev.example.com", "k3", Some(pin), false)
            .unwrap();
        let c = rc.pick(Some("tls")).unwrap();
        assert_eq!(c.url, "https://controller.dev.example.com");
        assert_eq!(c.tls_pin.as_deref(), Some(pin));
        assert!(rc
            .add("bad", "dev.example.com", "k", Some("nope"), false)
            .is_err());
        assert!(rc
            .add("bad", "http://dev.example.com", "k", Some(pin), false)
            .is_err());
        rc.save(&p).unwrap();
        let rc = FlynnRc::load(&p).unwrap();
        assert_eq!(rc.pick(None).unwrap().url, "http://10.0.0.1:1113");
        assert_eq!(rc.pick(Some("dev")).unwrap().key, "k2");
        let mut rc = rc;
        rc.remove("prod").unwrap();
        assert_eq!(rc.default.as_deref(), Some("dev"));
        assert!(rc.pick(Some("prod")).is_err());
    }

    #[test]
    fn garbage_rc_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rc");
        std::fs::write(&p, "[[[").unwrap();
        assert!(format!("{:#}", FlynnRc::load(&p).unwrap_err()).contains("is not valid"));
    }
}

//! Helpers for the state machine's tests, shared by every area's tests.

pub(crate) use crate::*;

pub(crate) const KEY: &str = "0123456789abcdef0123";

pub(crate) fn booted() -> ClusterState {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        ClusterCommand::Bootstrap {
            auth_key: KEY.into(),
            domain: None,
            controller_certificate: None,
            system_env: Default::default(),
        },
    )
    .0
    .unwrap();
    s.take_dirty();
    s
}

pub(crate) fn ok(s: &mut ClusterState, cmd: impl Into<Command>) -> (Response, Vec<Event>) {
    let (r, ev) = apply(s, cmd);
    (r.unwrap(), ev)
}

pub(crate) fn env_set(app: &str, t: Option<&str>, k: &str, v: &str) -> AppsCommand {
    AppsCommand::UpdateEnv {
        app: app.into(),
        proc_type: t.map(String::from),
        set: [(k.to_string(), v.to_string())].into(),
        unset: vec![],
        now_ms: 0,
    }
}

pub(crate) fn http(app: &str, domain: &str, path: Option<&str>) -> RoutesCommand {
    let mut route = RouteSpec::http(domain);
    if let RouteSpec::Http { path: p, .. } = &mut route {
        *p = path.map(String::from);
    }
    RoutesCommand::AddRoute {
        app: app.into(),
        route,
    }
}

/// Applies any area's command.
pub(crate) fn apply(s: &mut ClusterState, cmd: impl Into<Command>) -> (ApplyResult, Vec<Event>) {
    s.apply(cmd.into())
}

/// A one-layer image whose command is `/bin/httpd`.
pub(crate) fn image() -> Image {
    Image {
        layers: vec![Layer {
            sha512: "ab".repeat(64),
            size: 10,
            compression: LayerCompression::Gzip,
        }],
        config: ImageConfig {
            cmd: vec!["/bin/httpd".into()],
            ..ImageConfig::default()
        },
    }
}

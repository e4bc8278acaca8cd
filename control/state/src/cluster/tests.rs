use crate::testing::*;

#[test]
fn t10_bootstrap_creates_system_apps_once() {
    let mut s = booted();
    for name in SYSTEM_APPS {
        assert!(s.apps[*name].system, "{name}");
    }
    assert_eq!(s.controller_keys(), vec![KEY.to_string()]);
    let (r, _) = apply(
        &mut s,
        ClusterCommand::Bootstrap {
            auth_key: KEY.into(),
            domain: None,
            controller_certificate: None,
            system_env: Default::default(),
        },
    );
    assert!(matches!(r, Err(StateError::Conflict(_))));
}

#[test]
fn t11_bootstrap_records_the_domain_and_system_env() {
    let mut s = ClusterState::default();
    let boot = |domain: &str| ClusterCommand::Bootstrap {
        auth_key: KEY.into(),
        domain: Some(domain.into()),
        controller_certificate: None,
        system_env: [(
            "status".to_string(),
            [("AUTH_KEY".to_string(), "s3cr3t".to_string())].into(),
        )]
        .into(),
    };
    assert!(apply(&mut s, boot("*.example.com")).0.is_err());
    assert!(!s.bootstrapped());
    ok(&mut s, boot("Dev.Example.com"));
    assert_eq!(s.cluster.domain.as_deref(), Some("dev.example.com"));
    assert_eq!(s.apps["status"].env.get(None, "AUTH_KEY"), Some("s3cr3t"));
    let peers = ClusterCommand::SetDiscoverdPeers { peers: vec![] };
    assert!(apply(&mut s, peers).0.is_err());
}

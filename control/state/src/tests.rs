use crate::testing::*;

#[test]
fn t11_refused_command_changes_nothing() {
    let mut s = booted();
    let before = s.clone();
    for cmd in [
        Command::from(AppsCommand::CreateApp {
            name: "Bad Name".into(),
        }),
        AppsCommand::DeleteApp {
            name: "nope".into(),
        }
        .into(),
        AppsCommand::DeleteApp {
            name: "controller".into(),
        }
        .into(),
        env_set("nope", None, "A", "1").into(),
        env_set("controller", None, "AUTH_KEY", "short").into(),
        http("nope", "a.example.com", None).into(),
        RoutesCommand::AddRoute {
            app: "redis".into(),
            route: RouteSpec::Tcp {
                port: Some(80),
                service: None,
                leader: false,
            },
        }
        .into(),
    ] {
        let (r, ev) = apply(&mut s, cmd.clone());
        assert!(r.is_err(), "{cmd:?} should be refused");
        assert!(ev.is_empty());
        assert_eq!(s, before, "{cmd:?} changed state");
        assert!(s.take_dirty().is_empty());
    }
}

#[test]
fn t50_records_round_trip() {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
    ok(&mut s, http("web", "*.example.com", None));
    let mut loaded = ClusterState::default();
    for (k, v) in s.records() {
        loaded.load_record(&k, &v).unwrap();
    }
    s.take_dirty();
    assert_eq!(loaded, s);
}

#[test]
fn t51_dirty_names_deleted_records() {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
    s.take_dirty();
    ok(&mut s, AppsCommand::DeleteApp { name: "web".into() });
    let dirty = s.take_dirty();
    assert!(dirty.contains(&(apps::TABLE, "web".into())));
    assert_eq!(s.record(apps::TABLE, "web"), None);
}

#[test]
fn t52_restore_replaces_everything() {
    let mut a = booted();
    ok(
        &mut a,
        AppsCommand::CreateApp {
            name: "keep".into(),
        },
    );
    let mut b = booted();
    ok(
        &mut b,
        AppsCommand::CreateApp {
            name: "gone".into(),
        },
    );
    b.take_dirty();
    ok(
        &mut b,
        Command::Restore {
            state: Box::new(a.clone()),
        },
    );
    assert!(b.apps.contains_key("keep") && !b.apps.contains_key("gone"));
    let dirty = b.take_dirty();
    assert!(dirty.contains(&(apps::TABLE, "gone".into())));
    assert!(b.revision > a.revision);
}

#[test]
fn t53_a_backup_restores_only_into_a_fresh_cluster_keeping_its_hosts() {
    // The backed-up cluster: an app with env and a route, a volume on one of its hosts.
    let mut old = booted();
    ok(&mut old, AppsCommand::CreateApp { name: "web".into() });
    ok(&mut old, env_set("web", None, "K", "V"));
    ok(&mut old, http("web", "web.example.com", None));
    let vol = |host: u64, app: Option<&str>| crate::volumes::Volume {
        id: "v1".into(),
        host,
        provider: "zfs".into(),
        size: None,
        app: app.map(String::from),
        job: None,
        proc_type: None,
        path: None,
        snapshots: Vec::new(),
        created_ms: 1,
    };
    ok(
        &mut old,
        VolumesCommand::PutVolume {
            volume: vol(7, Some("web")),
        },
    );
    // The new cluster: the same volume received on its host 9, no owner yet.
    let mut new = booted();
    ok(
        &mut new,
        VolumesCommand::PutVolume {
            volume: vol(9, None),
        },
    );
    let peers_before = new.apps["discoverd"]
        .env
        .global
        .get("DISCOVERD_PEERS")
        .cloned();
    ok(
        &mut new,
        Command::RestoreBackup {
            state: Box::new(old.clone()),
        },
    );
    assert_eq!(new.apps["web"].env.global["K"], "V");
    assert_eq!(new.routes.routes.len(), old.routes.routes.len());
    let volumes: Vec<_> = new.volumes.volumes.values().collect();
    assert_eq!(volumes.len(), 1, "the new host's record, not the old one");
    assert_eq!(
        (volumes[0].host, volumes[0].app.as_deref()),
        (9, Some("web"))
    );
    assert_eq!(
        new.apps["discoverd"]
            .env
            .global
            .get("DISCOVERD_PEERS")
            .cloned(),
        peers_before
    );
    // Once it has apps, a cluster takes no backup.
    let (r, _) = apply(
        &mut new,
        Command::RestoreBackup {
            state: Box::new(old),
        },
    );
    assert!(matches!(r, Err(StateError::Conflict(_))), "{r:?}");
}

#[test]
fn t60_validation() {
    assert!(validate::domain("*.example.com").is_ok());
    assert!(validate::domain("a..b").is_err());
    assert!(validate::domain("").is_err());
    assert!(validate::path("api").is_err());
    assert!(validate::app_name("-x").is_err());
    assert!(validate::app_name(&"a".repeat(64)).is_err());
    assert!(validate::env_key("A=B").is_err());
    assert!(validate::instance("i", "nope", 5_000).is_err());
    assert!(validate::instance("i", "127.0.0.1:80", 5_000).is_ok());
}

#[test]
fn t70_batch_applies_each_command_with_its_own_result_and_revision() {
    let mut s = booted();
    let rev = s.revision;
    let (r, ev) = ok(
        &mut s,
        Command::Batch {
            commands: vec![
                AppsCommand::CreateApp { name: "a".into() }.into(),
                AppsCommand::CreateApp { name: "a".into() }.into(),
                http("a", "a.example.com", None).into(),
            ],
        },
    );
    let Response::Batch { results } = r else {
        panic!("{r:?}")
    };
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(StateError::Conflict(_))));
    assert!(results[2].is_ok());
    // Two commands changed state: two revisions; the refused one took none.
    assert_eq!(s.revision, rev + 2);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].revision, rev + 2);
    let nested = Command::Batch {
        commands: vec![Command::Batch { commands: vec![] }],
    };
    assert!(apply(&mut s, nested).0.is_err());
}

#[test]
fn t80_commands_keep_their_wire_format() {
    let cmd: Command = AppsCommand::CreateApp { name: "web".into() }.into();
    let json = serde_json::to_value(&cmd).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"area": "apps", "op": "create_app", "name": "web"})
    );
    let batch = Command::Batch {
        commands: vec![cmd.clone(), http("web", "a.example.com", None).into()],
    };
    let back: Command = serde_json::from_slice(&serde_json::to_vec(&batch).unwrap()).unwrap();
    assert_eq!(back, batch);
    // The state's JSON (snapshots, recover.json) keeps one flat object.
    let s = booted();
    let v = serde_json::to_value(&s).unwrap();
    for key in [
        "revision",
        "apps",
        "routes",
        "certificates",
        "services",
        "bootstrapped",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    let again: ClusterState = serde_json::from_value(v).unwrap();
    assert_eq!(again, s);
}

// Throwaway keys made for this test with ssh-keygen; they guard nothing.
const OPENSSH_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACCCYX8NhyxzADculhxeUSXsC6LIoLwwtnZ+8C4SHTW3pwAAAJBzeSiEc3ko\nhAAAAAtzc2gtZWQyNTUxOQAAACCCYX8NhyxzADculhxeUSXsC6LIoLwwtnZ+8C4SHTW3pw\nAAAEC/EkkJX5mcLriZ1duylw1VmmW2lDpMAm5oBCwiPM3lEoJhfw2HLHMANy6WHF5RJewL\nosigvDC2dn7wLhIdNbenAAAAB3Jvb3RAdm0BAgMEBQY=\n-----END OPENSSH PRIVATE KEY-----\n";
const OPENSSH_KEY_WITH_PASSPHRASE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABAW1rDeSN\norYJS4tVFwsywwAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAILIl26tS7+khOUvG\nCcFl8N6pXMwbDgekBwQ+4z4Hhk1mAAAAkGVt2kBJtVWyHJRfcxF0pxPeFZ4tJEHh0xe4ME\n8O1fR3IIHWiB6hNptzq4FgX8Re12O2cgq//KLGcn18MB/3hVzQmxVjET+5sK620d6Bgx7l\nu2J6NnHiz4ePPV8JK8i8venDZ6UM5dfUS5SqyVgwTU04MeXcYGHJxmMGqTIm02D3+csUM/\n8+MVUQ1rACHIKLyw==\n-----END OPENSSH PRIVATE KEY-----\n";
const PEM_RSA_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIICXQIBAAKBgQDVIMJNJlcjPkEqUAIjrWdl+7Dl3saX6TvIwsOtMxmSGo06uWh/\n9FKhYsMkj0TwJHwshJc6g+tuNMqq67ipr/Q6STgwRv0J8BlTuRV257ZHxSEScDu5\nerqJeHdlTJkKWro3d5UzJgGNFqycM4IbjzmnRkBKKU0GUpQe0PPAD8+d5QIDAQAB\nAoGAYoh5rCdso8uVXxWMV6hEpH6fgzbig7r9u8xnoPx99vE1mA++A2IWjaxWYeGm\n0otbqU1HiXMR9mqLxEekoTbK5wr+I+ZrQJMEhwj3Ii7KSTvO558q1kMAnQHv+WjI\n9uV0PKlhleauJk/24HMl9OWYsPpULFqrMpBj2iCRu1p5SsUCQQD7gkIIFUlSkeZ7\nNGZLGFtFmTQjkZ15WwoXzE1gaVBnEXOkT8OEBWph5yRv70hQCVwMn1tRO4Tn9Dfw\nwWa6vs4rAkEA2O8MMXHNfVHxfd8T/fjg4Tw4P4wt0UXyhIJ5v6O1zuVemXxPjJdf\nEvxmiTZF6eXx9b9Ccw3wIyZkAPSCrjlMLwJBAKhT14m9ZWNjzpPq0AO2e2+rR5/+\nlxxfd/PRgn/iPDOfFHyF/d7gGQEJR/O6e/VFLlwsU1ucsCjl5IK3jd+yUB0CQHMV\nBaPpWnjkEreSs1llQW9bcf+MTvYZJFnVmd7na1ix56iHAPB1kRNSYNbjut0lhmG3\nL/o3Z7BN+nljPTxN2zMCQQCcRAfey5nDKKd4o9TpfNQuXxMi4b8gMCD8B8IM4w1E\nebbnoHVvaMLGxwnBDUm0O0cTM4n1qwt7wu2qTW7yxO64\n-----END RSA PRIVATE KEY-----\n";

#[test]
fn t61_gitreceive_ssh_client_key_and_hosts_are_checked() {
    let mut s = booted();
    for key in [OPENSSH_KEY, PEM_RSA_KEY] {
        ok(&mut s, env_set("gitreceive", None, "SSH_CLIENT_KEY", key));
    }
    let hosts = "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIJhfw2HLHMANy6WHF5RJewLosigvDC2dn7wLhIdNben\n# a comment\n@cert-authority *.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIJhfw2HLHMANy6WHF5RJewLosigvDC2dn7wLhIdNben";
    ok(
        &mut s,
        env_set("gitreceive", None, "SSH_CLIENT_HOSTS", hosts),
    );
    let cut = &OPENSSH_KEY[..OPENSSH_KEY.len() / 2];
    let bad_body = OPENSSH_KEY.replace("b3Blbn", "b3!len");
    for (key, why) in [
        ("not a key", "BEGIN"),
        (cut, "END"),
        (bad_body.as_str(), "base64"),
        (OPENSSH_KEY_WITH_PASSPHRASE, "passphrase"),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
            "DER",
        ),
    ] {
        let before = s.apps["gitreceive"].clone();
        let (r, _) = apply(&mut s, env_set("gitreceive", None, "SSH_CLIENT_KEY", key));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("SSH_CLIENT_KEY") && e.contains(why),
            "{why}: {e}"
        );
        assert_eq!(s.apps["gitreceive"], before, "nothing changed");
    }
    let (r, _) = apply(
        &mut s,
        env_set("gitreceive", None, "SSH_CLIENT_HOSTS", "github.com ssh-rsa"),
    );
    assert!(r.unwrap_err().to_string().contains("line 1"));
    // Other apps may hold anything under these names.
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
    ok(&mut s, env_set("web", None, "SSH_CLIENT_KEY", "whatever"));
}

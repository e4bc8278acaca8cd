use crate::testing::*;

#[test]
fn t20_env_type_override_wins() {
    let mut s = booted();
    ok(&mut s, env_set("blobstore", None, "A", "global"));
    ok(&mut s, env_set("blobstore", Some("web"), "A", "web"));
    let env = &s.apps["blobstore"].env;
    assert_eq!(env.get(Some("web"), "A"), Some("web"));
    assert_eq!(env.get(Some("worker"), "A"), Some("global"));
    assert_eq!(env.get(None, "A"), Some("global"));
    ok(
        &mut s,
        AppsCommand::UpdateEnv {
            app: "blobstore".into(),
            proc_type: Some("web".into()),
            set: Default::default(),
            unset: vec!["A".into()],
            now_ms: 0,
        },
    );
    assert_eq!(
        s.apps["blobstore"].env.get(Some("web"), "A"),
        Some("global")
    );
    assert!(
        s.apps["blobstore"].env.types.is_empty(),
        "empty override is dropped"
    );
}

#[test]
fn t21_controller_key_rotation_as_in_flynn_docs() {
    let mut s = booted();
    let new = "fedcba9876543210fedc";
    ok(
        &mut s,
        env_set(
            "controller",
            Some("web"),
            "AUTH_KEY",
            &format!("{KEY},{new}"),
        ),
    );
    assert_eq!(s.controller_keys(), vec![KEY.to_string(), new.to_string()]);
    ok(&mut s, env_set("controller", None, "AUTH_KEY", new));
    assert_eq!(s.controller_keys().len(), 2, "web override still wins");
    ok(
        &mut s,
        AppsCommand::UpdateEnv {
            app: "controller".into(),
            proc_type: Some("web".into()),
            set: Default::default(),
            unset: vec!["AUTH_KEY".into()],
            now_ms: 0,
        },
    );
    assert_eq!(s.controller_keys(), vec![new.to_string()]);
}

#[test]
fn t22_controller_cannot_lose_its_key() {
    let mut s = booted();
    let (r, _) = apply(
        &mut s,
        AppsCommand::UpdateEnv {
            app: "controller".into(),
            proc_type: None,
            set: Default::default(),
            unset: vec!["AUTH_KEY".into()],
            now_ms: 0,
        },
    );
    assert!(matches!(r, Err(StateError::Invalid(_))));
    assert_eq!(s.controller_keys(), vec![KEY.to_string()]);
}

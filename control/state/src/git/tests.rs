use crate::git::{GitCommand, MAX_LOCK_TTL_MS};
use crate::testing::*;

fn lock(app: &str, host: u64, push: &str, now_ms: u64) -> GitCommand {
    GitCommand::Lock {
        app: app.into(),
        host,
        push: push.into(),
        ttl_ms: 30_000,
        now_ms,
    }
}

fn unlock(app: &str, push: &str, deployed: Option<&str>) -> GitCommand {
    GitCommand::Unlock {
        app: app.into(),
        push: push.into(),
        deployed: deployed.map(str::to_string),
    }
}

fn with_app(name: &str) -> ClusterState {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: name.into() });
    s
}

#[test]
fn t10_a_second_push_is_refused_while_the_first_holds_the_lock() {
    let mut s = with_app("web");
    ok(&mut s, lock("web", 1, "p1", 1_000));
    assert_eq!(
        s.git.repos["web"].host, 1,
        "the first push makes host 1 the home"
    );
    let rev = s.revision;
    let err = apply(&mut s, lock("web", 1, "p2", 2_000)).0.unwrap_err();
    assert_eq!(
        err,
        StateError::Conflict("a push to web is in progress".into())
    );
    assert_eq!(s.revision, rev, "a refusal changes nothing");
    // The holder renews its own lock.
    ok(&mut s, lock("web", 1, "p1", 20_000));
    assert_eq!(s.git.repos["web"].lock.as_ref().unwrap().expires_ms, 50_000);
    // Released, the next push takes it; the first deployed branch is the deploy branch.
    ok(&mut s, unlock("web", "p1", Some("main")));
    ok(&mut s, lock("web", 1, "p2", 21_000));
    ok(&mut s, unlock("web", "p2", Some("master")));
    let repo = &s.git.repos["web"];
    assert_eq!(repo.branch.as_deref(), Some("main"));
    assert_eq!(repo.pushes, 2);
    assert!(repo.lock.is_none());
}

#[test]
fn t11_a_lock_whose_holder_stopped_renewing_it_lapses() {
    let mut s = with_app("web");
    ok(&mut s, lock("web", 1, "p1", 1_000));
    ok(&mut s, lock("web", 1, "p2", 31_001));
    // The old holder can no longer release what it lost.
    let err = apply(&mut s, unlock("web", "p1", None)).0.unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{err:?}");
    assert_eq!(s.git.repos["web"].lock.as_ref().unwrap().push, "p2");
}

#[test]
fn t12_the_repository_has_one_home_host_until_moved() {
    let mut s = with_app("web");
    ok(&mut s, lock("web", 1, "p1", 1_000));
    ok(&mut s, unlock("web", "p1", None));
    let err = apply(&mut s, lock("web", 2, "p2", 2_000)).0.unwrap_err();
    assert_eq!(
        err,
        StateError::Conflict("the repository of web is on host 1".into())
    );
    ok(
        &mut s,
        GitCommand::MoveRepo {
            app: "web".into(),
            host: 2,
        },
    );
    ok(&mut s, lock("web", 2, "p2", 2_000));
}

#[test]
fn t13_bad_locks_and_unknown_apps_are_refused() {
    let mut s = with_app("web");
    let err = apply(&mut s, lock("nope", 1, "p1", 1)).0.unwrap_err();
    assert!(matches!(err, StateError::NotFound(_)), "{err:?}");
    for (push, ttl_ms) in [("", 1_000), ("p", 0), ("p", MAX_LOCK_TTL_MS + 1)] {
        let cmd = GitCommand::Lock {
            app: "web".into(),
            host: 1,
            push: push.into(),
            ttl_ms,
            now_ms: 1,
        };
        let err = apply(&mut s, cmd).0.unwrap_err();
        assert!(matches!(err, StateError::Invalid(_)), "{err:?}");
    }
    assert!(s.git.repos.is_empty());
}

#[test]
fn t14_a_deleted_app_loses_its_repository_and_a_new_one_starts_empty() {
    let mut s = with_app("web");
    ok(&mut s, lock("web", 1, "p1", 1_000));
    ok(&mut s, unlock("web", "p1", Some("main")));
    let first = s.git.repos["web"].dir_name();
    ok(&mut s, AppsCommand::DeleteApp { name: "web".into() });
    assert!(s.git.repos.is_empty());
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
    ok(&mut s, lock("web", 2, "p2", 2_000));
    let repo = &s.git.repos["web"];
    assert_ne!(repo.dir_name(), first, "a new incarnation, a new directory");
    assert_eq!(repo.branch, None);
    assert_eq!(repo.host, 2);
}

#[test]
fn t15_the_first_host_to_claim_a_new_repository_is_its_home() {
    let mut s = with_app("web");
    let claim = |host| GitCommand::Claim {
        app: "web".into(),
        host,
    };
    let (r, _) = ok(&mut s, claim(2));
    let Response::GitRepo { repo } = r else {
        panic!("{r:?}")
    };
    assert_eq!(repo.host, 2);
    let rev = s.revision;
    let (r, _) = ok(&mut s, claim(1));
    let Response::GitRepo { repo } = r else {
        panic!("{r:?}")
    };
    assert_eq!(repo.host, 2, "the first claim stands");
    assert_eq!(s.revision, rev, "a second claim changes nothing");
    let err = apply(&mut s, lock("web", 1, "p1", 1)).0.unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{err:?}");
}

//! Which pushes deploy. The pre-receive hook gets one line per updated ref
//! (`OLD NEW REF`); one branch deploys: the app's `DEPLOY_BRANCH` if set, else the branch
//! the app's first deployed push used, else `main` or `master`. Anything that would not
//! deploy is refused with one line that says what to push instead, and nothing changes.

/// All zeros: the old value of a new ref, the new value of a deleted one.
const ZERO: &str = "0000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

impl RefUpdate {
    fn branch(&self) -> Option<&str> {
        self.name.strip_prefix("refs/heads/")
    }

    fn deletes(&self) -> bool {
        is_zero(&self.new)
    }
}

fn is_zero(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b == b'0') && (id.len() == ZERO.len() || id.len() == 64)
}

/// The push's deploy: the branch and the commit to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deploy {
    pub branch: String,
    pub rev: String,
}

/// Why a push is refused: one line for the pusher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Parses the hook's standard input.
pub fn parse_updates(input: &str) -> Result<Vec<RefUpdate>, Refusal> {
    input
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(old), Some(new), Some(name), None) => Ok(RefUpdate {
                    old: old.into(),
                    new: new.into(),
                    name: name.into(),
                }),
                _ => Err(Refusal(format!("unreadable ref update {line:?}"))),
            }
        })
        .collect()
}

/// What this push does: the deploy (if a deploy branch is pushed), or the refusal.
/// `fixed` is the app's deploy branch when it has one (`DEPLOY_BRANCH`, or its first
/// deployed push's).
pub fn decide(updates: &[RefUpdate], fixed: Option<&str>) -> Result<Option<Deploy>, Refusal> {
    let mut deploy: Option<Deploy> = None;
    for u in updates {
        let Some(branch) = u.branch() else {
            // Tags and other refs are kept, not deployed.
            if u.deletes() {
                return Err(Refusal(format!("deleting {} is refused", u.name)));
            }
            continue;
        };
        if u.deletes() {
            return Err(Refusal(format!(
                "deleting branch {branch} is refused: the app's history stays"
            )));
        }
        let deploys = match fixed {
            Some(f) => branch == f,
            None => branch == "main" || branch == "master",
        };
        if !deploys {
            let to = fixed.unwrap_or("main");
            return Err(Refusal(format!(
                "pushes to {branch} are not deployed: push to {to} (git push flynn {branch}:{to})"
            )));
        }
        // A first push of both main and master deploys main.
        if deploy.as_ref().is_none_or(|d| d.branch != "main") {
            deploy = Some(Deploy {
                branch: branch.to_string(),
                rev: u.new.clone(),
            });
        }
    }
    Ok(deploy)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn up(old: &str, new: &str, name: &str) -> RefUpdate {
        RefUpdate {
            old: old.into(),
            new: new.into(),
            name: name.into(),
        }
    }

    #[test]
    fn t10_main_or_master_deploys_until_one_is_fixed() {
        let first = [up(ZERO, A, "refs/heads/master")];
        let d = decide(&first, None).unwrap().unwrap();
        assert_eq!((d.branch.as_str(), d.rev.as_str()), ("master", A));
        let both = [
            up(ZERO, A, "refs/heads/master"),
            up(ZERO, B, "refs/heads/main"),
        ];
        assert_eq!(decide(&both, None).unwrap().unwrap().branch, "main");
        // Once master deployed, main is refused with the branch to push.
        let err = decide(&[up(ZERO, B, "refs/heads/main")], Some("master")).unwrap_err();
        assert_eq!(
            err.0,
            "pushes to main are not deployed: push to master (git push flynn main:master)"
        );
        // DEPLOY_BRANCH may name any branch.
        let d = decide(&[up(A, B, "refs/heads/prod")], Some("prod")).unwrap();
        assert_eq!(d.unwrap().rev, B);
    }

    #[test]
    fn t11_other_branches_and_deletions_are_refused_tags_kept() {
        let err = decide(&[up(ZERO, A, "refs/heads/feature")], None).unwrap_err();
        assert!(err.0.contains("push to main"), "{err}");
        let err = decide(&[up(A, ZERO, "refs/heads/main")], Some("main")).unwrap_err();
        assert!(err.0.starts_with("deleting branch main"), "{err}");
        assert_eq!(decide(&[up(ZERO, A, "refs/tags/v1")], None).unwrap(), None);
        let err = decide(&[up(A, ZERO, "refs/tags/v1")], None).unwrap_err();
        assert!(err.0.contains("refs/tags/v1"), "{err}");
    }

    #[test]
    fn t12_hook_input_is_parsed_or_refused() {
        let text = format!("{ZERO} {A} refs/heads/main\n\n");
        assert_eq!(
            parse_updates(&text).unwrap(),
            vec![up(ZERO, A, "refs/heads/main")]
        );
        assert!(parse_updates("garbage\n").is_err());
    }
}

//! Named bearer tokens (`[[auth.tokens]]`): one token per team or service, each with its own
//! principal id, role and optional rate limit. The table keeps only SHA-256 digests of the tokens,
//! and [`TokenTable::lookup`] compares a presented token against every digest in constant time.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::{AuthMethod, Principal, Role};
use crate::config::{NamedToken, credential_path, credentials_directory, read_credential};

/// Principal ids the server gives to callers without a named token; a named token using one of
/// them would be mistaken for the shared token or for no-auth mode.
const RESERVED_NAMES: [&str; 2] = ["legacy-token", "anonymous"];

/// One configured token, without the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    /// Principal id of callers presenting this token.
    pub name: String,
    /// Their role.
    pub role: Role,
    /// Requests per second for this token (overrides the role's and the default).
    pub rate_limit_rps: Option<f64>,
    /// Burst for this token.
    pub rate_limit_burst: Option<u32>,
}

impl TokenEntry {
    /// The principal of a caller presenting this entry's token.
    pub fn principal(&self) -> Principal {
        Principal {
            id: self.name.clone(),
            role: self.role,
            method: AuthMethod::Token,
            email: None,
            tenant_id: None,
        }
    }
}

/// The named tokens, ready for lookups. Built anew on every config reload.
#[derive(Clone, Default)]
pub struct TokenTable {
    entries: Vec<TokenEntry>,
    /// `digests[i]` is the SHA-256 of `entries[i]`'s token.
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are left out: they are not the tokens, but nothing needs to see them.
        f.debug_struct("TokenTable")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl TokenTable {
    /// Builds the table. A relative `file` is looked up in `$CREDENTIALS_DIRECTORY` when that is set.
    ///
    /// Errors name the entry (`auth.tokens.<index>`) and never contain a token or a digest:
    /// duplicate or reserved names, neither or both of `sha256`/`file`, `sha256` not 64 hex
    /// characters, an unreadable or empty file, two entries with the same token, a rate limit
    /// that is not positive. All problems are reported, one per line.
    pub fn from_config(tokens: &[NamedToken]) -> Result<Self, String> {
        // Reading the process environment here (and not through the config loader's injected
        // environment) is acceptable: systemd sets `CREDENTIALS_DIRECTORY` for the process itself
        // (`LoadCredential=`), it never changes while the process runs, and tests use
        // `from_config_in` with an explicit directory instead.
        let creds = credentials_directory();
        Self::from_config_in(tokens, creds.as_deref())
    }

    /// [`Self::from_config`] with the credentials directory given explicitly.
    pub fn from_config_in(tokens: &[NamedToken], creds: Option<&Path>) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut table = TokenTable::default();
        // Index into `tokens` of each accepted entry, for "same token as" messages.
        let mut origin: Vec<usize> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let key = format!("auth.tokens.{i}");
            let name = t.name.trim();
            let mut ok = true;
            if name.is_empty() {
                problems.push(format!("{key}.name: empty; every token needs a name"));
                ok = false;
            } else if name != t.name || name.chars().any(char::is_control) {
                problems.push(format!(
                    "{key}.name: {:?} has surrounding spaces or control characters",
                    t.name
                ));
                ok = false;
            } else if RESERVED_NAMES.contains(&name) {
                problems.push(format!(
                    "{key}.name: {name:?} is reserved (the server uses it for other callers)"
                ));
                ok = false;
            } else if let Some(j) = tokens[..i].iter().position(|o| o.name == t.name) {
                problems.push(format!(
                    "{key}.name: {name:?} is already used by auth.tokens.{j}"
                ));
                ok = false;
            }
            let label = format!("{key} ({:?})", t.name);
            if let Some(rps) = t.rate_limit_rps
                && !(rps.is_finite() && rps > 0.0)
            {
                problems.push(format!(
                    "{key}.rate_limit_rps ({:?}): must be a positive number",
                    t.name
                ));
                ok = false;
            }
            if t.rate_limit_burst == Some(0) {
                problems.push(format!(
                    "{key}.rate_limit_burst ({:?}): must be at least 1",
                    t.name
                ));
                ok = false;
            }
            let digest = match (&t.sha256, &t.file) {
                (None, None) => {
                    problems.push(format!("{label}: set one of `sha256` or `file`"));
                    None
                }
                (Some(_), Some(_)) => {
                    problems.push(format!("{label}: set `sha256` or `file`, not both"));
                    None
                }
                (Some(hex), None) => match parse_sha256(hex) {
                    Some(d) => Some(d),
                    None => {
                        // The value is not echoed: a token pasted here by mistake must not reach a log.
                        problems.push(format!(
                            "{key}.sha256 ({:?}): not 64 hexadecimal characters (the SHA-256 of the token, e.g. from `sha256sum`)",
                            t.name
                        ));
                        None
                    }
                },
                (None, Some(file)) => {
                    let path = credential_path(file, creds);
                    match read_credential(&path) {
                        Ok(token) => Some(Sha256::digest(token.as_bytes()).into()),
                        Err(e) => {
                            problems.push(format!("{key}.file ({:?}): {e}", t.name));
                            None
                        }
                    }
                }
            };
            let Some(digest) = digest else { continue };
            if let Some(j) = table.digests.iter().position(|d| *d == digest) {
                problems.push(format!(
                    "{label}: same token as auth.tokens.{} ({:?}); each token must identify one caller",
                    origin[j], tokens[origin[j]].name
                ));
                continue;
            }
            if !ok {
                continue;
            }
            table.entries.push(TokenEntry {
                name: t.name.clone(),
                role: t.role,
                rate_limit_rps: t.rate_limit_rps,
                rate_limit_burst: t.rate_limit_burst,
            });
            table.digests.push(digest);
            origin.push(i);
        }
        if problems.is_empty() {
            Ok(table)
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The entry whose token this is. The presented token's SHA-256 is compared with every
    /// entry's digest in constant time, and the loop never exits early, so timing tells neither
    /// whether nor which entry matched.
    pub fn lookup(&self, presented: &str) -> Option<&TokenEntry> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = u64::MAX;
        for (i, d) in self.digests.iter().enumerate() {
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            found.conditional_assign(&index, d.ct_eq(&digest));
        }
        usize::try_from(found)
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    /// Whether no named token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The configured entries, in config order.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }
}

/// 64 hex digits (either case) → 32 bytes.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "team-a-4f1c0d9e2b7a";
    const TOKEN_B: &str = "team-b-88e5a1c3d0f2";

    fn hex_sha256(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn by_hash(name: &str, token: &str, role: Role) -> NamedToken {
        NamedToken {
            name: name.into(),
            role,
            sha256: Some(hex_sha256(token)),
            ..NamedToken::default()
        }
    }

    fn by_file(name: &str, file: &Path) -> NamedToken {
        NamedToken {
            name: name.into(),
            file: Some(file.to_path_buf()),
            ..NamedToken::default()
        }
    }

    #[test]
    fn lookup_by_sha256_and_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.token");
        std::fs::write(&file, format!("{TOKEN_B}\n")).unwrap();
        let mut a = by_hash("team-a", TOKEN_A, Role::ReadOnly);
        a.rate_limit_rps = Some(2.5);
        a.rate_limit_burst = Some(5);
        let table = TokenTable::from_config_in(&[a, by_file("team-b", &file)], None).unwrap();
        assert!(!table.is_empty());

        let e = table.lookup(TOKEN_A).unwrap();
        assert_eq!(e.name, "team-a");
        assert_eq!(e.role, Role::ReadOnly);
        assert_eq!(e.rate_limit_rps, Some(2.5));
        assert_eq!(e.rate_limit_burst, Some(5));
        let p = e.principal();
        assert_eq!(p.id, "team-a");
        assert_eq!(p.role, Role::ReadOnly);
        assert_eq!(p.method, AuthMethod::Token);

        // The file's trailing newline is not part of the token.
        let e = table.lookup(TOKEN_B).unwrap();
        assert_eq!(e.name, "team-b");
        assert_eq!(e.role, Role::User);
        assert!(table.lookup(&format!("{TOKEN_B}\n")).is_none());
    }

    #[test]
    fn upper_case_sha256_is_accepted() {
        let mut t = by_hash("a", TOKEN_A, Role::Admin);
        t.sha256 = t.sha256.map(|h| h.to_uppercase());
        let table = TokenTable::from_config_in(&[t], None).unwrap();
        assert_eq!(table.lookup(TOKEN_A).map(|e| e.role), Some(Role::Admin));
    }

    #[test]
    fn wrong_token_finds_nothing() {
        let table = TokenTable::from_config_in(
            &[
                by_hash("a", TOKEN_A, Role::User),
                by_hash("b", TOKEN_B, Role::User),
            ],
            None,
        )
        .unwrap();
        assert!(table.lookup("").is_none());
        assert!(table.lookup("team-a").is_none());
        assert!(table.lookup(&TOKEN_A[..TOKEN_A.len() - 1]).is_none());
        // The digest itself is not a token.
        assert!(table.lookup(&hex_sha256(TOKEN_A)).is_none());
        assert_eq!(table.lookup(TOKEN_B).map(|e| e.name.as_str()), Some("b"));
    }

    #[test]
    fn empty_table() {
        let table = TokenTable::from_config_in(&[], None).unwrap();
        assert!(table.is_empty());
        assert!(table.lookup(TOKEN_A).is_none());
    }

    #[test]
    fn relative_file_is_read_from_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ci.token"), TOKEN_A).unwrap();
        let t = by_file("ci", Path::new("ci.token"));
        let table = TokenTable::from_config_in(std::slice::from_ref(&t), Some(dir.path())).unwrap();
        assert_eq!(table.lookup(TOKEN_A).map(|e| e.name.as_str()), Some("ci"));
        // Without the directory, the relative path is not found there.
        let err = TokenTable::from_config_in(&[t], None).unwrap_err();
        assert!(
            err.starts_with("auth.tokens.0.file (\"ci\"): cannot read ci.token"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = TokenTable::from_config_in(
            &[
                by_hash("ci", TOKEN_A, Role::User),
                by_hash("ci", TOKEN_B, Role::User),
            ],
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.1.name: \"ci\" is already used by auth.tokens.0"
        );
    }

    #[test]
    fn empty_and_reserved_names_are_refused() {
        let err =
            TokenTable::from_config_in(&[by_hash("", TOKEN_A, Role::User)], None).unwrap_err();
        assert_eq!(err, "auth.tokens.0.name: empty; every token needs a name");
        let err = TokenTable::from_config_in(&[by_hash("legacy-token", TOKEN_A, Role::User)], None)
            .unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.0.name: \"legacy-token\" is reserved (the server uses it for other callers)"
        );
        let err =
            TokenTable::from_config_in(&[by_hash(" ci", TOKEN_A, Role::User)], None).unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.0.name: \" ci\" has surrounding spaces or control characters"
        );
    }

    #[test]
    fn neither_or_both_sources_are_refused() {
        let neither = NamedToken {
            name: "ci".into(),
            ..NamedToken::default()
        };
        let err = TokenTable::from_config_in(&[neither], None).unwrap_err();
        assert_eq!(err, "auth.tokens.0 (\"ci\"): set one of `sha256` or `file`");

        let mut both = by_hash("ci", TOKEN_A, Role::User);
        both.file = Some(std::path::PathBuf::from("/nonexistent"));
        let err = TokenTable::from_config_in(&[both], None).unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.0 (\"ci\"): set `sha256` or `file`, not both"
        );
    }

    #[test]
    fn bad_sha256_is_refused_without_echoing_it() {
        for bad in [
            "abc",
            &format!("{}zz", &hex_sha256(TOKEN_A)[..62]),
            &format!("{}0", hex_sha256(TOKEN_A)),
            TOKEN_A,
        ] {
            let mut t = by_hash("ci", TOKEN_A, Role::User);
            t.sha256 = Some(bad.to_string());
            let err = TokenTable::from_config_in(&[t], None).unwrap_err();
            assert_eq!(
                err,
                "auth.tokens.0.sha256 (\"ci\"): not 64 hexadecimal characters (the SHA-256 of the token, e.g. from `sha256sum`)"
            );
            assert!(!err.contains(bad));
        }
    }

    #[test]
    fn unreadable_or_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.token");
        let err = TokenTable::from_config_in(&[by_file("ci", &missing)], None).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "auth.tokens.0.file (\"ci\"): cannot read {}: ",
                missing.display()
            )),
            "{err}"
        );
        let err = TokenTable::from_config_in(&[by_file("ci", dir.path())], None).unwrap_err();
        assert!(
            err.starts_with("auth.tokens.0.file (\"ci\"): cannot read "),
            "{err}"
        );

        let empty = dir.path().join("empty.token");
        std::fs::write(&empty, "\n").unwrap();
        let err = TokenTable::from_config_in(&[by_file("ci", &empty)], None).unwrap_err();
        assert_eq!(
            err,
            format!("auth.tokens.0.file (\"ci\"): {} is empty", empty.display())
        );
    }

    #[test]
    fn same_token_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.token");
        std::fs::write(&file, TOKEN_A).unwrap();
        let err = TokenTable::from_config_in(
            &[by_hash("a", TOKEN_A, Role::Admin), by_file("b", &file)],
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.1 (\"b\"): same token as auth.tokens.0 (\"a\"); each token must identify one caller"
        );
        assert!(!err.contains(TOKEN_A));
    }

    #[test]
    fn bad_rate_limits_are_refused() {
        let mut t = by_hash("ci", TOKEN_A, Role::User);
        t.rate_limit_rps = Some(0.0);
        t.rate_limit_burst = Some(0);
        let err = TokenTable::from_config_in(&[t], None).unwrap_err();
        assert_eq!(
            err,
            "auth.tokens.0.rate_limit_rps (\"ci\"): must be a positive number\n\
             auth.tokens.0.rate_limit_burst (\"ci\"): must be at least 1"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let neither = NamedToken {
            name: "b".into(),
            ..NamedToken::default()
        };
        let err = TokenTable::from_config_in(&[by_hash("", TOKEN_A, Role::User), neither], None)
            .unwrap_err();
        assert_eq!(err.lines().count(), 2, "{err}");
        assert!(err.lines().all(|l| l.starts_with("auth.tokens.")), "{err}");
    }

    #[test]
    fn debug_shows_no_token_or_digest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.token");
        std::fs::write(&file, TOKEN_B).unwrap();
        let table = TokenTable::from_config_in(
            &[by_hash("a", TOKEN_A, Role::User), by_file("b", &file)],
            None,
        )
        .unwrap();
        let dbg = format!("{table:?}");
        assert!(dbg.contains("\"a\"") && dbg.contains("\"b\""), "{dbg}");
        for secret in [TOKEN_A, TOKEN_B, &hex_sha256(TOKEN_A), &hex_sha256(TOKEN_B)] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(!dbg.contains("digests"), "{dbg}");
    }
}

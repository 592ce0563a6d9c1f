//! The `authorization` header and JWT handling ([`crate::auth::Authenticator`] with a shared
//! token, a named token and an HS256 secret): hostile headers never panic and never authenticate;
//! a signed token resolves to its claims; a token with any byte changed is refused (or, when the
//! change only touches unused base64 bits, resolves to the very same principal).

use jsonwebtoken::{EncodingKey, Header, encode};
use proptest::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::auth::{AuthError, AuthMethod, Authenticator, Principal};
use crate::config::{AuthConfig, JwtConfig, NamedToken, Secret};

const SHARED: &str = "shared-token-for-the-fuzz-suite";
const NAMED: &str = "named-token-of-team-a";
const JWT_SECRET: &str = "a-fuzz-secret-that-is-32-bytes-long!";

fn authenticator() -> Authenticator {
    let auth = AuthConfig {
        token: Some(Secret::new(SHARED)),
        jwt: JwtConfig {
            secret: Some(Secret::new(JWT_SECRET)),
            ..JwtConfig::default()
        },
        tokens: vec![NamedToken {
            name: "team-a".into(),
            sha256: Some(format!("{:x}", Sha256::digest(NAMED.as_bytes()))),
            ..NamedToken::default()
        }],
        ..AuthConfig::default()
    };
    Authenticator::from_config(&auth, false).expect("fuzz auth config")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sign(claims: &serde_json::Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("signing")
}

/// What a header may authenticate as: only the configured credentials, never anything a random
/// header makes up.
fn assert_only_known(header: &[u8], result: &Result<Principal, AuthError>) {
    if let Ok(p) = result {
        let known = (header == format!("Bearer {SHARED}").as_bytes() && p.id == "legacy-token")
            || (header == format!("Bearer {NAMED}").as_bytes() && p.id == "team-a");
        assert!(
            known,
            "{:?} authenticated as {p:?}",
            String::from_utf8_lossy(header)
        );
    }
}

/// `Bearer ` headers built from pieces of real credentials, so the generator gets near them.
fn near_miss() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just("Bearer "),
            Just("bearer "),
            Just("Bearer  "),
            Just("Bearer"),
            Just("Basic "),
            Just("")
        ],
        prop_oneof![
            Just(SHARED.to_string()),
            Just(NAMED.to_string()),
            "[A-Za-z0-9_.=-]{0,80}",
            "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}",
        ],
        proptest::collection::vec(any::<u8>(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(scheme, token, junk, append)| {
            let mut h = format!("{scheme}{token}").into_bytes();
            if append {
                h.extend(junk);
            }
            h
        })
}

proptest! {
    #![proptest_config(super::config(256))]

    #[test]
    fn hostile_authorization_headers_never_panic_or_authenticate(
        header in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let auth = authenticator();
        assert_only_known(&header, &auth.authenticate(Some(&header), None));
    }

    #[test]
    fn near_miss_headers_authenticate_only_as_the_exact_credential(header in near_miss()) {
        let auth = authenticator();
        assert_only_known(&header, &auth.authenticate(Some(&header), None));
    }

    #[test]
    fn signed_jwts_resolve_to_their_claims(
        sub in prop_oneof!["[^\u{0}]{1,40}", "[a-zA-Z0-9 ._@:/-]{1,40}"],
        tenant in proptest::option::of("[a-z0-9:%-]{1,20}"),
        email in proptest::option::of("[a-z]{1,10}@[a-z]{1,10}\\.test"),
    ) {
        let auth = authenticator();
        let mut claims = json!({ "sub": sub, "exp": unix_now() + 600 });
        if let Some(t) = &tenant {
            claims["tenant_id"] = json!(t);
        }
        if let Some(e) = &email {
            claims["email"] = json!(e);
        }
        let header = format!("Bearer {}", sign(&claims));
        // The verifier's rule for `sub`: not blank, no control characters, bounded length.
        let usable = !sub.trim().is_empty() && !sub.chars().any(char::is_control) && sub.len() <= 256;
        let p = match auth.authenticate(Some(header.as_bytes()), None) {
            Ok(p) => p,
            Err(e) => {
                prop_assert!(!usable, "{sub:?} refused: {e}");
                return Ok(());
            }
        };
        prop_assert!(usable, "{sub:?} accepted");
        prop_assert_eq!(p.method, AuthMethod::Jwt);
        prop_assert_eq!(p.id, sub);
        prop_assert_eq!(p.tenant_id, tenant);
        prop_assert_eq!(p.email, email);
    }

    #[test]
    fn a_jwt_with_a_byte_changed_is_refused(
        sub in "[a-z]{1,20}",
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let auth = authenticator();
        let token = sign(&json!({ "sub": sub, "exp": unix_now() + 600 }));
        let genuine = auth.authenticate(Some(format!("Bearer {token}").as_bytes()), None).unwrap();
        let mut mutated = format!("Bearer {token}").into_bytes();
        let at = "Bearer ".len() + at % token.len();
        prop_assume!(mutated[at] != byte);
        mutated[at] = byte;
        match auth.authenticate(Some(&mutated), None) {
            Err(_) => {}
            // Changing the unused low bits of a segment's last base64 character decodes to the
            // same bytes: the same token, signed, for the same principal.
            Ok(p) => prop_assert_eq!(p, genuine),
        }
    }

    #[test]
    fn forged_jwts_never_panic_or_authenticate(
        header in "\\{[\"a-zA-Z0-9:,{} ]{0,80}\\}",
        claims in "\\{[\"a-zA-Z0-9:,{}\\[\\] ]{0,200}\\}",
        signature in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!("{}.{}.{}", b64.encode(&header), b64.encode(&claims), b64.encode(&signature));
        let auth = authenticator();
        let h = format!("Bearer {token}");
        assert_only_known(h.as_bytes(), &auth.authenticate(Some(h.as_bytes()), None));
    }
}

/// Corpus: each line of each file is one `authorization` header.
#[test]
fn auth_corpus() {
    let auth = authenticator();
    let mut lines = 0;
    for (_name, bytes) in super::corpus("auth") {
        for header in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            lines += 1;
            assert_only_known(header, &auth.authenticate(Some(header), None));
        }
    }
    assert!(lines > 0);
}

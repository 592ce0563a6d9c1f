//! Plugin signatures: `<plugin>.sig` holds, on its first line, the base64 Ed25519 signature of the
//! plugin's 32-byte SHA-256 digest; it is checked against every public key of the trusted-keys
//! folder (`*.pub`). A key file is a PEM block `PUBLIC KEY` (PKIX, as `openssl pkey -pubout`
//! writes), a PEM block `ED25519 PUBLIC KEY` (the raw 32 bytes), or the raw 32-byte key in base64.

use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::Digest as _;

/// The DER prefix of an Ed25519 `SubjectPublicKeyInfo` (algorithm 1.3.101.112, no parameters,
/// then a 33-byte BIT STRING with no unused bits); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A trusted key and the file it came from.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// The key file's name.
    pub file: String,
    /// The key.
    pub key: VerifyingKey,
}

/// The SHA-256 digest of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

/// Parses one key file's text.
pub fn parse_key(text: &[u8]) -> Result<VerifyingKey, String> {
    let raw: Vec<u8> = if text.windows(10).any(|w| w == b"-----BEGIN") {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(text).map_err(|e| format!("not a PEM block: {e}"))?;
        match pem.label.as_str() {
            "PUBLIC KEY" => pem
                .contents
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .ok_or("the PUBLIC KEY block is not an Ed25519 key")?
                .to_vec(),
            "ED25519 PUBLIC KEY" => pem.contents,
            other => return Err(format!("unexpected PEM block `{other}`")),
        }
    } else {
        let s = std::str::from_utf8(text).map_err(|_| "not text")?;
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("not base64: {e}"))?
    };
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| format!("an Ed25519 key has 32 bytes, this one {}", raw.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 key: {e}"))
}

/// The keys of `dir` (`*.pub`); unreadable key files are skipped with a warning. A missing folder
/// holds no keys.
pub fn load_keys(dir: &Path) -> Vec<TrustedKey> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pub"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let file = p.file_name()?.to_string_lossy().into_owned();
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_key(&t))
            {
                Ok(key) => Some(TrustedKey { file, key }),
                Err(e) => {
                    tracing::warn!(key = %p.display(), "trusted key skipped: {e}");
                    None
                }
            }
        })
        .collect()
}

/// Checks the signature text (a `.sig` file's content) over `digest`; the name of the key that
/// signed it, or why none did.
pub fn verify(digest: &[u8; 32], sig_text: &str, keys: &[TrustedKey]) -> Result<String, String> {
    let line = sig_text.lines().next().unwrap_or("").trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line)
        .map_err(|e| format!("the signature is not base64: {e}"))?;
    let sig = Signature::from_slice(&raw)
        .map_err(|_| format!("a signature has 64 bytes, this one {}", raw.len()))?;
    if keys.is_empty() {
        return Err("no trusted key to check the signature against".into());
    }
    keys.iter()
        .find(|k| k.key.verify_strict(digest, &sig).is_ok())
        .map(|k| k.file.clone())
        .ok_or_else(|| "the signature does not match any trusted key".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn the_three_key_formats_parse_and_verify() {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let pk = sk.verifying_key().to_bytes();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let pem = |label: &str, b: &[u8]| {
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                b64(b)
            )
        };
        let spki = [&ED25519_SPKI_PREFIX[..], &pk].concat();
        for text in [
            pem("PUBLIC KEY", &spki),
            pem("ED25519 PUBLIC KEY", &pk),
            format!("{}\n", b64(&pk)),
        ] {
            assert_eq!(parse_key(text.as_bytes()).unwrap().to_bytes(), pk, "{text}");
        }
        assert!(parse_key(pem("PUBLIC KEY", &pk).as_bytes()).is_err());
        assert!(parse_key(b"c2hvcnQ=").is_err());

        let d = digest(b"plugin bytes");
        let sig = b64(&sk.sign(&d).to_bytes());
        let keys = [TrustedKey {
            file: "k.pub".into(),
            key: sk.verifying_key(),
        }];
        assert_eq!(
            verify(&d, &format!("{sig}\ncomment"), &keys).unwrap(),
            "k.pub"
        );
        assert!(verify(&digest(b"other"), &sig, &keys).is_err());
        let other = [TrustedKey {
            file: "o.pub".into(),
            key: SigningKey::from_bytes(&[8u8; 32]).verifying_key(),
        }];
        assert!(verify(&d, &sig, &other).is_err());
        assert!(verify(&d, "!!", &keys).is_err());
    }

    #[test]
    fn unreadable_key_files_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let pk = SigningKey::from_bytes(&[9u8; 32])
            .verifying_key()
            .to_bytes();
        std::fs::write(
            d.path().join("good.pub"),
            base64::engine::general_purpose::STANDARD.encode(pk),
        )
        .unwrap();
        std::fs::write(d.path().join("bad.pub"), "garbage").unwrap();
        std::fs::write(d.path().join("ignored.txt"), "x").unwrap();
        let keys = load_keys(d.path());
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].file, "good.pub");
        assert!(load_keys(&d.path().join("missing")).is_empty());
    }
}

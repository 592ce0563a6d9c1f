//! JSON written by hand where its shape is fixed: the keys and fixed values are written as they
//! are and only the values go through escaping, which a string that needs none skips (nearly every
//! text). Each writer's output is held equal to serde_json's by the tests of its caller; the
//! strings here by the test below.

use serde::Serialize;

/// A string as serde_json writes it: between quotes as it is when nothing in it needs escaping
/// (nearly every text), else escaped by serde_json.
pub fn json_str(buf: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        json_value(buf, s);
        return;
    }
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
}

/// Whether `bytes` hold a byte serde_json escapes (a control character, `"` or `\\`), read eight
/// bytes at a time: a byte below `0x20` (or equal to `"` or `\\` after XOR) borrows in the
/// subtraction and leaves its top bit set; bytes from `0x80` up have it cleared by `!word`.
/// Borrows only run on from a byte that matched, so the answer is exact.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const TOPS: u64 = ONES << 7;
    let has_below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & TOPS != 0;
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        let w = u64::from_le_bytes(eight);
        if has_below(w, 0x20)
            || has_below(w ^ (ONES * u64::from(b'"')), 1)
            || has_below(w ^ (ONES * u64::from(b'\\')), 1)
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A small value (a number, `null`, a string, our usage) as serde_json writes it (strings escaped
/// as serde_json escapes them).
pub fn json_value(buf: &mut Vec<u8>, v: &(impl Serialize + ?Sized)) {
    // Writing these into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, v);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_the_bytes_serde_json_writes() {
        let long = "a".repeat(40);
        let mut cases: Vec<String> = ["", "plain", "é ✓ 𝄞 \u{2028} del \u{7f}", "tok0 tok1 "]
            .map(String::from)
            .to_vec();
        // Each character serde_json escapes, at each place of an 8-byte word and in the tail.
        for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
            for at in [0, 1, 6, 7, 8, 15, 16, 17, 31, 38, 39] {
                let mut t = long.clone();
                t.replace_range(at..at + 1, &special.to_string());
                cases.push(t);
            }
        }
        // Every ASCII character, in a word and in the tail.
        for c in (0u8..0x80).map(char::from) {
            cases.push(format!("abc{c}efghijklmn{c}pq"));
        }
        for t in cases {
            let mut buf = Vec::new();
            json_str(&mut buf, &t);
            assert_eq!(buf, serde_json::to_vec(&t).unwrap(), "{t:?}");
        }
    }
}

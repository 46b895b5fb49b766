//! Which values [`super::redact`] is sure to leave as they are, decided in one pass.
//!
//! Every match of the redaction patterns holds a `=` (a form pair), a `"` (a JSON pair),
//! whitespace after `bearer` or `basic`, or `eyJ` (a JWT), and the patterns fold case by
//! Unicode. So printable ASCII with no `=`, `"` or `\`, no `eyJ`, and spaces only where
//! there is no `b` or `B`, cannot match: it is *plain*. Ids, provider names, methods, route
//! templates, `app <id>` (most of the time) and outcomes are plain.
//!
//! The audit line is redacted part by part with this ([`super::audit_line`]): each value
//! that is not plain goes through the patterns, and so does the span prefix unless every
//! value recorded on the span was plain ([`AllPlain`]). The whole line's pre-check looked
//! at every `=` and `"` of its `name="value"` fields, and the line has about twenty
//! (callgrind: 6,500 of the line's 14,800 instructions). The line's own text (names,
//! quotes, the timestamp) holds no secret.

use tracing::field::{Field, Visit};

/// Whether `value` is plain (see the module's comment).
pub fn plain(value: &str) -> bool {
    let mut p = Plainness::default();
    p.feed(value.as_bytes());
    p.plain()
}

const REJECT: u8 = 1;
const SPACE: u8 = 2;
const LETTER_B: u8 = 4;
const LETTER_J: u8 = 8;

/// Each byte's class: what it can contribute to a pattern's match.
static CLASS: [u8; 256] = {
    let mut t = [REJECT; 256];
    let mut c = b'!';
    while c <= b'~' {
        t[c as usize] = 0;
        c += 1;
    }
    t[b'=' as usize] = REJECT;
    t[b'"' as usize] = REJECT;
    t[b'\\' as usize] = REJECT;
    t[b' ' as usize] = SPACE;
    t[b'b' as usize] = LETTER_B;
    t[b'B' as usize] = LETTER_B;
    t[b'J' as usize] = LETTER_J;
    t
};

/// [`plain`] over text that comes in pieces (a value formatted through `fmt::Write`).
#[derive(Default)]
pub struct Plainness {
    seen: u8,
    /// The last two bytes fed, for an `eyJ` across two pieces.
    last: [u8; 2],
}

impl Plainness {
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut seen = 0;
        for &c in bytes {
            seen |= CLASS[c as usize];
        }
        if seen & LETTER_J != 0 {
            let [a, b] = self.last;
            let found = bytes.windows(3).any(|w| w == b"eyJ")
                || (bytes.first() == Some(&b'J') && [a, b] == *b"ey")
                || (bytes.len() >= 2 && b == b'e' && bytes[..2] == *b"yJ");
            if found {
                seen |= REJECT;
            }
        }
        self.seen |= seen & !LETTER_J;
        self.last = match bytes {
            [.., y, z] => [*y, *z],
            [z] => [self.last[1], *z],
            [] => self.last,
        };
    }

    pub fn plain(&self) -> bool {
        self.seen & REJECT == 0 && self.seen & (SPACE | LETTER_B) != SPACE | LETTER_B
    }
}

impl std::fmt::Write for Plainness {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.feed(s.as_bytes());
        Ok(())
    }
}

/// Visits a span's values and says whether all are plain. Each value is judged alone, as
/// it is in the line (a space in one and a `b` in the next cannot make a `bearer` pair).
pub struct AllPlain(pub bool);

impl Visit for AllPlain {
    fn record_str(&mut self, _: &Field, value: &str) {
        self.0 = self.0 && plain(value);
    }

    fn record_debug(&mut self, _: &Field, value: &dyn std::fmt::Debug) {
        if self.0 {
            let mut p = Plainness::default();
            self.0 = std::fmt::write(&mut p, format_args!("{value:?}")).is_ok() && p.plain();
        }
    }

    // Numbers and booleans are digits, signs, points and letters: plain.
    fn record_i64(&mut self, _: &Field, _: i64) {}
    fn record_u64(&mut self, _: &Field, _: u64) {}
    fn record_bool(&mut self, _: &Field, _: bool) {}
}

#[cfg(test)]
mod tests {
    use super::{Plainness, plain};
    use crate::support::logging::redact;

    /// `plain` is a promise that the patterns leave a value alone, in the line as well as
    /// on its own. Strings built from the pieces patterns look for (and their near misses),
    /// a thousand of them from a fixed seed: every one called plain must come through
    /// `redact` unchanged, alone and inside an audit line's fields; fed in two pieces, the
    /// verdict is the same.
    #[test]
    fn plain_values_are_ones_redaction_leaves_alone() {
        let pieces = [
            "bearer ",
            "Basic",
            "b",
            " ",
            "eyJ",
            "ey",
            "J",
            "hbGciOi",
            ".",
            "=",
            "\"",
            "\\",
            ":",
            "token",
            "code",
            "access_token",
            "STATE",
            "x",
            "0b5c-1",
            "/",
            "-",
            "_",
            "é",
            "\u{212A}ey",
            "\t",
            "&",
            "app ",
            "refused: ",
        ];
        let mut seed: u64 = 0x5eed;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        let (mut plain_seen, mut other_seen) = (0, 0);
        for _ in 0..1000 {
            let value: String = (0..1 + next(6)).map(|_| pieces[next(pieces.len())]).collect();
            for cut in (0..=value.len()).filter(|&i| value.is_char_boundary(i)) {
                let mut p = Plainness::default();
                p.feed(&value.as_bytes()[..cut]);
                p.feed(&value.as_bytes()[cut..]);
                assert_eq!(p.plain(), plain(&value), "{value:?} cut at {cut}");
            }
            if !plain(&value) {
                other_seen += 1;
                continue;
            }
            plain_seen += 1;
            assert_eq!(redact(&value), value.as_str());
            // Quoted, and unquoted (as `who` is) at the end. (In the middle, an unquoted value
            // ending in `basic` makes the whole line's patterns mask the next field's name;
            // part by part, the line keeps it. Neither is a secret.)
            let line = format!(
                "INFO request{{otel.kind=\"server\"}}: audit action=\"x\" connection=\"{value}\" outcome=\"ok\" who={value}\n"
            );
            assert_eq!(redact(&line), line.as_str(), "{value:?}");
            let json = format!("{{\"message\":\"audit\",\"connection\":{},\"who\":\"x\"}}", serde_json::json!(value));
            assert_eq!(redact(&json), json.as_str(), "{value:?}");
        }
        // Both kinds were drawn (the test is not vacuous).
        assert!(plain_seen > 100 && other_seen > 100, "{plain_seen} plain, {other_seen} not");
        for secretish in ["Bearer abc", "x token=abc", "eyJhbGciOi", "\"code\":\"abc\"", "é", "basic\tabc", "a\\b"] {
            assert!(!plain(secretish), "{secretish}");
        }
        for ordinary in ["app 1111-aaaa", "refused: invalid_grant", "token_handed_out", "erp-1", "/api/{id}/token"] {
            assert!(plain(ordinary), "{ordinary}");
        }
    }
}

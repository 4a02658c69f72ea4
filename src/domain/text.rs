//! Text from callers: what names, reasons, links and filters must be before they are kept.
//!
//! PostgreSQL refuses a NUL in text and SQLite stores it, so these checks are also what keeps
//! the two databases alike: text that passes here is stored the same way by either, and a bad
//! value is refused with its field named before it can join anyone else's transaction.

use super::Invalid;

/// The longest reason a caller may give for a decision (review, cancellation, pause).
pub const MAX_REASON_CHARS: usize = 2_000;
/// The longest value a list filter takes (a principal's name, a resource id).
pub const MAX_FILTER_CHARS: usize = 200;
/// How much of a refused value is kept where it is shown (the audit log's request id).
pub const MAX_SHOWN_CHARS: usize = 64;

/// C0 controls (NUL to US), DEL and C1 controls: Unicode general category Cc.
pub fn is_control(c: char) -> bool {
    c.is_control()
}

/// Bidirectional embedding, override and isolate controls: they reorder how the text around
/// them is shown, so a name can read differently from what it is.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A character that shows nothing by itself: a format character (Unicode general category
/// Cf), another default-ignorable code point (Unicode 16, DerivedCoreProperties.txt), or a
/// blank that is not whitespace (the Hangul fillers, the blank Braille pattern).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        // Default-ignorable code points.
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
            // The other format characters.
            | '\u{0600}'..='\u{0605}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            // Blank, though neither whitespace nor default-ignorable.
            | '\u{2800}'
    )
}

/// Whether a reader would see anything: a character that is not whitespace, invisible or a
/// control.
pub fn has_visible(text: &str) -> bool {
    text.chars()
        .any(|c| !c.is_whitespace() && !is_invisible(c) && !is_control(c))
}

/// Refuses control characters (NUL included) anywhere in `text`.
pub fn check_no_controls(text: &str) -> Result<(), Invalid> {
    if text.chars().any(is_control) {
        Err(Invalid::new("must not contain control characters"))
    } else {
        Ok(())
    }
}

/// One line of text the caller must give: trimmed, something visible, at most `max_chars`
/// characters, no control characters (a line break included).
pub fn required_line(input: &str, max_chars: usize) -> Result<String, Invalid> {
    let text = input.trim();
    if !has_visible(text) {
        return Err(Invalid::new("is required"));
    }
    check_line(text, max_chars)?;
    Ok(text.to_owned())
}

/// One line of text the caller may leave empty (then `None`): otherwise as [`required_line`].
pub fn optional_line(input: &str, max_chars: usize) -> Result<Option<String>, Invalid> {
    let text = input.trim();
    if text.is_empty() {
        return Ok(None);
    }
    check_line(text, max_chars)?;
    Ok(Some(text.to_owned()))
}

fn check_line(text: &str, max_chars: usize) -> Result<(), Invalid> {
    if text.chars().count() > max_chars {
        return Err(Invalid::new(format!(
            "must be at most {max_chars} characters"
        )));
    }
    check_no_controls(text)
}

/// A caller's value as it may be shown or kept even when it was refused: trimmed, control
/// characters escaped (`\u{0}`), at most `max_chars` characters.
pub fn shown(input: &str, max_chars: usize) -> String {
    let input = input.trim();
    // Most values are short printable ASCII (ids, codes): nothing to escape or cut, so they
    // are kept in one copy rather than a character at a time.
    if input.len() <= max_chars && input.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return input.to_owned();
    }
    shown_by_char(input, max_chars)
}

/// [`shown`], a character at a time, of trimmed `input`.
fn shown_by_char(input: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(input.len().min(4 * max_chars));
    for (i, c) in input.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if is_control(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why an operator decided something (a review, a cancellation, a pause): one line of 1 to
/// [`MAX_REASON_CHARS`] characters, shown to everyone who reads the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn parse(input: &str) -> Result<Self, Invalid> {
        required_line(input, MAX_REASON_CHARS).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_c0_del_and_c1() {
        for c in ['\0', '\n', '\t', '\u{1F}', '\u{7F}', '\u{80}', '\u{9F}'] {
            assert!(is_control(c), "{c:?}");
            assert!(check_no_controls(&format!("a{c}b")).is_err(), "{c:?}");
        }
        for c in [' ', 'a', '가', '\u{A0}', '\u{200B}'] {
            assert!(!is_control(c), "{c:?}");
        }
    }

    #[test]
    fn text_of_only_invisible_characters_shows_nothing() {
        for text in [
            "",
            " ",
            "\u{200B}\u{202E}",
            "\u{FEFF}",
            "\u{3164}\u{3164}",
            "\u{2066}\u{2069}",
            "\u{E0041}",
        ] {
            assert!(!has_visible(text), "{text:?}");
        }
        for text in ["a", "하늘베이커리", " \u{200B}x", "\u{0301}"] {
            assert!(has_visible(text), "{text:?}");
        }
    }

    #[test]
    fn bidi_controls_are_the_embedding_override_and_isolate_ones() {
        for c in ('\u{202A}'..='\u{202E}').chain('\u{2066}'..='\u{2069}') {
            assert!(is_bidi_control(c), "{c:?}");
            assert!(is_invisible(c), "{c:?}");
        }
        assert!(!is_bidi_control('\u{200F}'));
    }

    #[test]
    fn lines_are_trimmed_capped_and_free_of_controls() {
        assert_eq!(
            required_line("  bank incident ", 20).as_deref(),
            Ok("bank incident")
        );
        assert!(required_line(" \u{200B} ", 20).is_err());
        assert!(required_line("a\0b", 20).is_err());
        assert!(required_line("two\nlines", 20).is_err());
        assert!(required_line(&"가".repeat(21), 20).is_err());
        assert_eq!(required_line(&"가".repeat(20), 20), Ok("가".repeat(20)));
        assert_eq!(optional_line("  ", 5), Ok(None));
        assert_eq!(optional_line(" ab ", 5), Ok(Some("ab".to_owned())));
        assert!(optional_line("a\u{85}b", 5).is_err());
        assert!(optional_line("abcdef", 5).is_err());
    }

    #[test]
    fn reasons_take_up_to_two_thousand_characters() {
        assert!(Reason::parse(&"x".repeat(MAX_REASON_CHARS)).is_ok());
        assert!(Reason::parse(&"x".repeat(MAX_REASON_CHARS + 1)).is_err());
        assert!(Reason::parse(&"x".repeat(300_000)).is_err());
        assert!(Reason::parse("").is_err());
        assert_eq!(Reason::parse(" ok ").expect("ok").as_str(), "ok");
    }

    proptest::proptest! {
        /// The short cut for plain ASCII shows what going a character at a time shows.
        #[test]
        fn shown_is_the_same_by_either_path(
            input in proptest::prop_oneof![
                proptest::prelude::any::<String>(),
                "[ -~]{0,40}",
                "[ -~\t\n\u{0}\u{7f}]{0,40}",
            ],
            max_chars in 0_usize..48,
        ) {
            proptest::prop_assert_eq!(
                shown(&input, max_chars),
                shown_by_char(input.trim(), max_chars)
            );
        }
    }

    #[test]
    fn shown_escapes_controls_and_cuts_long_values() {
        assert_eq!(shown(" a\0b ", 10), "a\\u{0}b");
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("0190-abc", 64), "0190-abc");
    }
}

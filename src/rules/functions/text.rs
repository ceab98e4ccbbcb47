//! Character-level text rules of the function library: simple (one-to-one) case mappings with
//! the Turkish/Azerbaijani exceptions (`ToUpper`, `ToLower`, `InStr` text compare), proper case
//! (`PCase`) and diacritic stripping (`NormalizeDiacritics`), spec §6.
//!
//! Pure functions over `&str`/`char`; no allocation beyond the returned strings.

use unicode_normalization::char::{is_combining_mark, is_public_assigned};
use unicode_normalization::UnicodeNormalization;

/// Case-mapping rules selected by a culture (spec §6 ToLower/ToUpper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CaseRules {
    /// Invariant rules (every culture except Turkish and Azerbaijani).
    #[default]
    Invariant,
    /// Turkish/Azerbaijani dotted and dotless i (`I`↔`ı`, `İ`↔`i`).
    Turkic,
}

/// The simple lower-case mapping of `c` (UnicodeData; one character to one character).
pub fn simple_lower(c: char) -> char {
    if c == '\u{130}' {
        // İ: full mapping is "i̇"; the simple mapping is "i".
        return 'i';
    }
    single(c.to_lowercase()).unwrap_or(c)
}

/// The simple upper-case mapping of `c`. A character without a one-to-one mapping (`ß`) stays.
pub fn simple_upper(c: char) -> char {
    let u = c as u32;
    // Greek letters with ypogegrammeni: the full mapping has two characters, the simple one
    // maps to the capital with prosgegrammeni.
    let iota = match u {
        0x1F80..=0x1F87 | 0x1F90..=0x1F97 | 0x1FA0..=0x1FA7 => Some(u + 8),
        0x1FB3 | 0x1FC3 | 0x1FF3 => Some(u + 9),
        _ => None,
    };
    if let Some(m) = iota.and_then(char::from_u32) {
        return m;
    }
    single(c.to_uppercase()).unwrap_or(c)
}

/// The simple title-case mapping of `c`.
pub fn simple_title(c: char) -> char {
    match c as u32 {
        0x01C4..=0x01C6 => '\u{1C5}',
        0x01C7..=0x01C9 => '\u{1C8}',
        0x01CA..=0x01CC => '\u{1CB}',
        0x01F1..=0x01F3 => '\u{1F2}',
        // Georgian Mkhedruli letters have upper-case (Mtavruli) forms but title-case to themselves.
        0x10D0..=0x10FA | 0x10FD..=0x10FF => c,
        _ => simple_upper(c),
    }
}

fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

/// Lower case with `rules`.
pub fn to_lower(s: &str, rules: CaseRules) -> String {
    // ASCII text lower-cases byte by byte (only the Turkic `I` leaves ASCII).
    if s.is_ascii() && !(rules == CaseRules::Turkic && s.contains('I')) {
        return s.to_ascii_lowercase();
    }
    s.chars()
        .map(|c| match (rules, c) {
            (CaseRules::Turkic, 'I') => 'ı',
            _ => simple_lower(c),
        })
        .collect()
}

/// Upper case with `rules`.
pub fn to_upper(s: &str, rules: CaseRules) -> String {
    // ASCII text upper-cases byte by byte (only the Turkic `i` leaves ASCII).
    if s.is_ascii() && !(rules == CaseRules::Turkic && s.contains('i')) {
        return s.to_ascii_uppercase();
    }
    s.chars()
        .map(|c| match (rules, c) {
            (CaseRules::Turkic, 'i') => 'İ',
            _ => simple_upper(c),
        })
        .collect()
}

/// Reads a culture name: empty (invariant) or a language tag of hyphen-separated ASCII
/// letter/digit parts of 1–8 characters whose first part has 2–3 letters. `None` if malformed.
pub fn culture_rules(tag: &str) -> Option<CaseRules> {
    if tag.is_empty() {
        return Some(CaseRules::Invariant);
    }
    let mut parts = tag.split('-');
    let lang = parts.next()?;
    if !(2..=3).contains(&lang.len()) || !lang.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    for p in parts {
        if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
    }
    Some(match lang.to_ascii_lowercase().as_str() {
        "tr" | "az" => CaseRules::Turkic,
        _ => CaseRules::Invariant,
    })
}

/// Whether `c` belongs to a word for `PCase` without explicit separators: letters, marks,
/// numbers, and (not being in REF's separator list) private-use and unassigned code points.
/// Everything else — separators Z*, Cc, Cf, punctuation P*, symbols S* — separates words.
pub fn is_default_word_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric();
    }
    let u = c as u32;
    // Circled/squared Latin letters are Other_Alphabetic but of category So (a separator).
    let alphabetic_symbol = matches!(
        u,
        0x24B6..=0x24E9 | 0x1F130..=0x1F149 | 0x1F150..=0x1F169 | 0x1F170..=0x1F189
    );
    if alphabetic_symbol {
        return false;
    }
    if c.is_alphabetic() || c.is_numeric() || is_combining_mark(c) {
        return true;
    }
    let private_use = matches!(u, 0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD);
    // is_public_assigned is false for unassigned (Cn) and private-use code points.
    private_use || !is_public_assigned(c)
}

/// Proper case: in every maximal run of word characters the first is title-cased and the rest
/// lower-cased; separators are copied. `separators` `None` = the default classification.
pub fn pcase(s: &str, separators: Option<&[char]>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_word = false;
    for c in s.chars() {
        let word = match separators {
            Some(seps) => !seps.contains(&c),
            None => is_default_word_char(c),
        };
        if !word {
            out.push(c);
            in_word = false;
        } else if in_word {
            out.push(simple_lower(c));
        } else {
            out.push(simple_title(c));
            in_word = true;
        }
    }
    out
}

/// `NormalizeDiacritics` (spec §6): NFD; for each base character and its marks, apply REF's
/// letter replacements; if the base is then made of ASCII letters its marks are dropped,
/// otherwise base and marks stay; NFC.
pub fn normalize_diacritics(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut base: Option<char> = None;
    let mut marks = String::new();
    let flush = |out: &mut String, base: Option<char>, marks: &mut String| {
        let Some(b) = base else {
            out.push_str(marks);
            marks.clear();
            return;
        };
        let replaced: &str = match b {
            'æ' => "ae",
            'Æ' => "AE",
            'ø' => "oe",
            'Ø' => "OE",
            'œ' => "oe",
            'Œ' => "OE",
            'ß' => "ss",
            'ł' => "l",
            'Ł' => "L",
            'ı' => "i",
            _ => "",
        };
        if !replaced.is_empty() {
            out.push_str(replaced);
        } else if b.is_ascii_alphabetic() {
            out.push(b);
        } else {
            out.push(b);
            out.push_str(marks);
        }
        marks.clear();
    };
    for c in s.nfd() {
        if is_combining_mark(c) {
            marks.push(c);
        } else {
            flush(&mut out, base, &mut marks);
            base = Some(c);
        }
    }
    flush(&mut out, base, &mut marks);
    out.nfc().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn simple_case_mappings() {
        assert_eq!(to_upper("straße", CaseRules::Invariant), "STRAßE");
        assert_eq!(to_lower("İSTANBUL", CaseRules::Invariant), "istanbul");
        assert_eq!(to_upper("istanbul", CaseRules::Turkic), "İSTANBUL");
        assert_eq!(to_lower("ISTANBUL", CaseRules::Turkic), "ıstanbul");
        assert_eq!(to_upper("ıi", CaseRules::Invariant), "II");
        assert_eq!(to_upper("ᾳ", CaseRules::Invariant), "ᾼ");
        assert_eq!(to_upper("ŉ", CaseRules::Invariant), "ŉ");
        assert_eq!(to_upper("ǆ", CaseRules::Invariant), "Ǆ");
        assert_eq!(to_lower("ΣΑΣ", CaseRules::Invariant), "σασ");
        assert_eq!(to_upper("𐐨", CaseRules::Invariant), "𐐀");
        assert_eq!(simple_title('ǆ'), 'ǅ');
        assert_eq!(simple_title('ა'), 'ა');
        assert_eq!(simple_upper('ﬀ'), 'ﬀ');
    }

    #[test]
    fn cultures() {
        assert_eq!(culture_rules("tr-TR"), Some(CaseRules::Turkic));
        assert_eq!(culture_rules("AZ-Latn-AZ"), Some(CaseRules::Turkic));
        assert_eq!(culture_rules("en-US"), Some(CaseRules::Invariant));
        assert_eq!(culture_rules("fil"), Some(CaseRules::Invariant));
        assert_eq!(culture_rules(""), Some(CaseRules::Invariant));
        for bad in [
            "e",
            "engl",
            "en_US",
            "en-",
            "-en",
            "en--US",
            "1n",
            "en-US!",
            "tr-TOOLONGPART",
        ] {
            assert_eq!(culture_rules(bad), None, "{bad}");
        }
    }

    #[test]
    fn proper_case() {
        assert_eq!(pcase("JOHN o'BRIEN-smith", None), "John O'Brien-Smith");
        assert_eq!(pcase("  hello   world ", None), "  Hello   World ");
        assert_eq!(pcase("1st place", None), "1st Place");
        assert_eq!(pcase("élan ÉCOLE", None), "Élan École");
        assert_eq!(pcase("a_b.c@d", None), "A_B.C@D");
        assert_eq!(pcase("ⓐbc", None), "ⓐBc");
        assert_eq!(pcase("ǆemal", None), "ǅemal");
        assert_eq!(pcase("o'brien smith", Some(&[' '])), "O'brien Smith");
        assert_eq!(pcase("a-b c", Some(&['-'])), "A-B c");
        assert_eq!(pcase("", None), "");
    }

    #[test]
    fn diacritics() {
        let cases = [
            ("äçďéğíľñőřšťůÿž", "acdegilnorstuyz"),
            ("İstanbul", "Istanbul"),
            ("æÆøØœŒßłŁı", "aeAEoeOEoeOEsslLi"),
            ("ā́ ḕ ḙ", "a e e"),
            ("ŕĥẁ", "rhw"),
            ("đðþ", "đðþ"),
            ("йё", "йё"),
            ("ά", "ά"),
            ("Zoë Saldaña", "Zoe Saldana"),
            ("\u{301}x", "\u{301}x"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_diacritics(input), want, "{input}");
        }
    }
}

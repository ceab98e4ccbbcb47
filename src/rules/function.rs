//! The function table of the expression language (spec §6): names, canonical spellings and arity.

/// A function of the expression language. Names resolve case-insensitively (spec §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)] // each variant is named after the function it stands for; see spec §6
pub enum Function {
    Append,
    AppRoleAssignmentsComplex,
    AssertiveAppRoleAssignmentsComplex,
    BitAnd,
    CBool,
    CDate,
    Coalesce,
    ConvertToBase64,
    ConvertToUTF8Hex,
    Count,
    CStr,
    DateAdd,
    DateDiff,
    DateFromNum,
    DefaultDomain,
    FormatDateTime,
    Guid,
    IgnoreFlowIfNullOrEmpty,
    IIF,
    InStr,
    IsNull,
    IsNullOrEmpty,
    IsPresent,
    IsString,
    Item,
    Join,
    Left,
    Len,
    Mid,
    NormalizeDiacritics,
    Not,
    Now,
    NumFromDate,
    PCase,
    RandomString,
    Redact,
    RemoveDuplicates,
    Replace,
    SelectUniqueValue,
    SingleAppRoleAssignment,
    Split,
    StripSpaces,
    Switch,
    ToLower,
    ToUpper,
    Word,
}

/// How many slots a function takes (spec §6, "slots" column): `min..=max`, `max` `None` = unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arity {
    /// Fewest slots.
    pub min: usize,
    /// Most slots; `None` when the function is variadic.
    pub max: Option<usize>,
}

impl Arity {
    /// Whether `slots` slots are accepted.
    pub fn accepts(self, slots: usize) -> bool {
        slots >= self.min && self.max.is_none_or(|m| slots <= m)
    }
}

impl Function {
    /// Every function, in canonical-name order.
    pub const ALL: [Function; 46] = [
        Function::Append,
        Function::AppRoleAssignmentsComplex,
        Function::AssertiveAppRoleAssignmentsComplex,
        Function::BitAnd,
        Function::CBool,
        Function::CDate,
        Function::Coalesce,
        Function::ConvertToBase64,
        Function::ConvertToUTF8Hex,
        Function::Count,
        Function::CStr,
        Function::DateAdd,
        Function::DateDiff,
        Function::DateFromNum,
        Function::DefaultDomain,
        Function::FormatDateTime,
        Function::Guid,
        Function::IgnoreFlowIfNullOrEmpty,
        Function::IIF,
        Function::InStr,
        Function::IsNull,
        Function::IsNullOrEmpty,
        Function::IsPresent,
        Function::IsString,
        Function::Item,
        Function::Join,
        Function::Left,
        Function::Len,
        Function::Mid,
        Function::NormalizeDiacritics,
        Function::Not,
        Function::Now,
        Function::NumFromDate,
        Function::PCase,
        Function::RandomString,
        Function::Redact,
        Function::RemoveDuplicates,
        Function::Replace,
        Function::SelectUniqueValue,
        Function::SingleAppRoleAssignment,
        Function::Split,
        Function::StripSpaces,
        Function::Switch,
        Function::ToLower,
        Function::ToUpper,
        Function::Word,
    ];

    /// The canonical spelling (spec §6).
    pub fn name(self) -> &'static str {
        use Function::*;
        match self {
            Append => "Append",
            AppRoleAssignmentsComplex => "AppRoleAssignmentsComplex",
            AssertiveAppRoleAssignmentsComplex => "AssertiveAppRoleAssignmentsComplex",
            BitAnd => "BitAnd",
            CBool => "CBool",
            CDate => "CDate",
            Coalesce => "Coalesce",
            ConvertToBase64 => "ConvertToBase64",
            ConvertToUTF8Hex => "ConvertToUTF8Hex",
            Count => "Count",
            CStr => "CStr",
            DateAdd => "DateAdd",
            DateDiff => "DateDiff",
            DateFromNum => "DateFromNum",
            DefaultDomain => "DefaultDomain",
            FormatDateTime => "FormatDateTime",
            Guid => "Guid",
            IgnoreFlowIfNullOrEmpty => "IgnoreFlowIfNullOrEmpty",
            IIF => "IIF",
            InStr => "InStr",
            IsNull => "IsNull",
            IsNullOrEmpty => "IsNullOrEmpty",
            IsPresent => "IsPresent",
            IsString => "IsString",
            Item => "Item",
            Join => "Join",
            Left => "Left",
            Len => "Len",
            Mid => "Mid",
            NormalizeDiacritics => "NormalizeDiacritics",
            Not => "Not",
            Now => "Now",
            NumFromDate => "NumFromDate",
            PCase => "PCase",
            RandomString => "RandomString",
            Redact => "Redact",
            RemoveDuplicates => "RemoveDuplicates",
            Replace => "Replace",
            SelectUniqueValue => "SelectUniqueValue",
            SingleAppRoleAssignment => "SingleAppRoleAssignment",
            Split => "Split",
            StripSpaces => "StripSpaces",
            Switch => "Switch",
            ToLower => "ToLower",
            ToUpper => "ToUpper",
            Word => "Word",
        }
    }

    /// Resolves a name case-insensitively (spec §2.6).
    pub fn from_name(name: &str) -> Option<Function> {
        Function::ALL
            .iter()
            .copied()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// The slot counts the function accepts (spec §6).
    pub fn arity(self) -> Arity {
        use Function::*;
        let (min, max) = match self {
            DefaultDomain | Guid | Now => (0, Some(0)),
            AppRoleAssignmentsComplex
            | AssertiveAppRoleAssignmentsComplex
            | CBool
            | CDate
            | ConvertToBase64
            | ConvertToUTF8Hex
            | Count
            | CStr
            | DateFromNum
            | IgnoreFlowIfNullOrEmpty
            | IsNull
            | IsNullOrEmpty
            | IsPresent
            | IsString
            | Len
            | NormalizeDiacritics
            | Not
            | NumFromDate
            | Redact
            | RemoveDuplicates
            | SingleAppRoleAssignment
            | StripSpaces => (1, Some(1)),
            Append | BitAnd | Item | Left | Split => (2, Some(2)),
            DateAdd | DateDiff | IIF | Mid | Word => (3, Some(3)),
            PCase | ToLower | ToUpper => (1, Some(2)),
            FormatDateTime => (2, Some(4)),
            InStr => (2, Some(4)),
            RandomString => (5, Some(6)),
            Replace => (2, Some(7)),
            Coalesce => (1, None),
            Join | SelectUniqueValue => (2, None),
            Switch => (4, None),
        };
        Arity { min, max }
    }
}

impl std::fmt::Display for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_case_insensitively_and_round_trip() {
        for f in Function::ALL {
            assert_eq!(Function::from_name(f.name()), Some(f));
            assert_eq!(Function::from_name(&f.name().to_lowercase()), Some(f));
        }
        assert_eq!(Function::from_name("iif"), Some(Function::IIF));
        assert_eq!(Function::from_name("Trim"), None);
    }

    #[test]
    fn all_is_sorted_and_complete() {
        let mut sorted = Function::ALL;
        sorted.sort_by_key(|f| f.name().to_ascii_lowercase());
        assert_eq!(sorted, Function::ALL);
        assert!(Function::Switch.arity().accepts(6));
        assert!(!Function::Now.arity().accepts(1));
    }
}

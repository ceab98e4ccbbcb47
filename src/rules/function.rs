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

/// One parameter slot of a function call (spec §6): its documented name and whether it may be left
/// empty (omitted) so that the documented default applies (spec §3, §4.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The parameter name as REF writes it (`numChars`, `regexPattern`, …).
    pub name: &'static str,
    /// Whether an empty slot is allowed here.
    pub optional: bool,
}

const fn req(name: &'static str) -> Option<Slot> {
    Some(Slot {
        name,
        optional: false,
    })
}

const fn opt(name: &'static str) -> Option<Slot> {
    Some(Slot {
        name,
        optional: true,
    })
}

impl Function {
    /// `Redact` and `IgnoreFlowIfNullOrEmpty`: calls that mark the outcome of the whole flow and
    /// are peeled off the compiled tree when they are outermost (spec §3.1).
    pub fn is_flow_wrapper(self) -> bool {
        matches!(self, Function::Redact | Function::IgnoreFlowIfNullOrEmpty)
    }

    /// Functions that must be the outermost call, or sit directly under flow wrappers (spec §3.1):
    /// `SelectUniqueValue`, `AppRoleAssignmentsComplex`, `AssertiveAppRoleAssignmentsComplex`.
    pub fn is_top_level_only(self) -> bool {
        matches!(
            self,
            Function::SelectUniqueValue
                | Function::AppRoleAssignmentsComplex
                | Function::AssertiveAppRoleAssignmentsComplex
        )
    }

    /// Functions whose only argument must be the attribute reference `[appRoleAssignments]`.
    pub fn takes_app_role_assignments(self) -> bool {
        matches!(
            self,
            Function::AppRoleAssignmentsComplex
                | Function::AssertiveAppRoleAssignmentsComplex
                | Function::SingleAppRoleAssignment
        )
    }

    /// Functions that evaluate only the arguments they need (spec §4.8): `IIF`, `Switch`,
    /// `Coalesce`, `SelectUniqueValue`.
    pub fn is_lazy(self) -> bool {
        matches!(
            self,
            Function::IIF | Function::Switch | Function::Coalesce | Function::SelectUniqueValue
        )
    }

    /// The parameter at 0-based `index` of a call with `slots` slots: its name and whether it is
    /// optional. `None` when `index` is beyond what the function accepts for that slot count (the
    /// arity check reports that). The slot count matters for `FormatDateTime`, whose 2-, 3- and
    /// 4-slot forms put different parameters in the same position (spec §6).
    ///
    /// Optional slots (everything else is required):
    /// * `FormatDateTime` (4 slots): `dateTimeStyles` (slot 2);
    /// * `InStr`: `start` (3), `compareType` (4);
    /// * `PCase`: `wordSeparators` (2); `ToLower`/`ToUpper`: `culture` (2);
    /// * `RandomString`: `CharactersToAvoid` (6);
    /// * `Replace`: every slot but `source` (validity is decided by the mode table instead);
    /// * `Switch`: `defaultValue` (2).
    pub fn slot(self, index: usize, slots: usize) -> Option<Slot> {
        use Function::*;
        let names: &[&str] = match self {
            Append => &["source", "suffix"],
            AppRoleAssignmentsComplex
            | AssertiveAppRoleAssignmentsComplex
            | SingleAppRoleAssignment => &["appRoleAssignments"],
            BitAnd => &["value1", "value2"],
            CBool
            | CDate
            | IgnoreFlowIfNullOrEmpty
            | IsNull
            | IsNullOrEmpty
            | IsPresent
            | IsString => &["expression"],
            ConvertToBase64 | ConvertToUTF8Hex | NormalizeDiacritics | Not | StripSpaces => {
                &["source"]
            }
            Count | RemoveDuplicates => &["attribute"],
            CStr | DateFromNum | NumFromDate | Redact => &["value"],
            DateAdd => &["interval", "value", "dateTime"],
            DateDiff => &["interval", "date1", "date2"],
            DefaultDomain | Guid | Now => &[],
            FormatDateTime => match slots {
                2 => &["value", "outputFormat"],
                3 => &["source", "inputFormat", "outputFormat"],
                _ => &["source", "dateTimeStyles", "inputFormat", "outputFormat"],
            },
            IIF => &["condition", "valueIfTrue", "valueIfFalse"],
            InStr => &["value1", "value2", "start", "compareType"],
            Item => &["attribute", "index"],
            Left => &["string", "numChars"],
            Len => &["string"],
            Mid => &["source", "start", "length"],
            PCase => &["source", "wordSeparators"],
            RandomString => &[
                "Length",
                "MinimumNumbers",
                "MinimumSpecialCharacters",
                "MinimumCapital",
                "MinimumLowerCase",
                "CharactersToAvoid",
            ],
            Replace => &[
                "source",
                "oldValue",
                "regexPattern",
                "regexGroupName",
                "replacementValue",
                "replacementAttributeName",
                "template",
            ],
            Split => &["source", "delimiter"],
            ToLower | ToUpper => &["source", "culture"],
            Word => &["string", "wordNumber", "delimiters"],
            // Variadic functions.
            Coalesce => return req("source"),
            Join => {
                return if index == 0 {
                    req("separator")
                } else {
                    req("source")
                }
            }
            SelectUniqueValue => return req("uniqueValueRule"),
            Switch => {
                return match index {
                    0 => req("source"),
                    1 => opt("defaultValue"),
                    i if i % 2 == 0 => req("key"),
                    _ => req("value"),
                }
            }
        };
        let name = *names.get(index)?;
        let optional = match self {
            FormatDateTime => slots == 4 && index == 1,
            InStr => index >= 2,
            PCase | ToLower | ToUpper => index == 1,
            RandomString => index == 5,
            Replace => index >= 1,
            _ => false,
        };
        if optional {
            opt(name)
        } else {
            req(name)
        }
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

    #[test]
    fn every_accepted_slot_has_a_name() {
        for f in Function::ALL {
            let arity = f.arity();
            let max = arity.max.unwrap_or(arity.min + 3);
            for slots in arity.min..=max {
                for i in 0..slots {
                    assert!(f.slot(i, slots).is_some(), "{f} slot {i} of {slots}");
                }
                if arity.max == Some(slots) {
                    assert!(f.slot(slots, slots).is_none(), "{f} beyond {slots}");
                }
            }
        }
        assert_eq!(Function::Switch.slot(1, 4).map(|s| s.optional), Some(true));
        assert_eq!(Function::Switch.slot(2, 4).map(|s| s.name), Some("key"));
        assert_eq!(
            Function::FormatDateTime.slot(1, 3).map(|s| s.name),
            Some("inputFormat")
        );
        assert_eq!(
            Function::FormatDateTime.slot(1, 4).map(|s| s.optional),
            Some(true)
        );
        assert_eq!(Function::Left.slot(1, 2).map(|s| s.optional), Some(false));
    }
}

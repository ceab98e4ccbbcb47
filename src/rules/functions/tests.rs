use super::*;
use crate::rules::context::{AppRoleValue, SeededRng, UsedValues};
use crate::rules::value::Decimal;
use chrono::TimeZone;
use proptest::prelude::*;

fn s(x: &str) -> EvalValue {
    EvalValue::from(x)
}
fn i(x: i64) -> EvalValue {
    EvalValue::Integer(x)
}
fn m(xs: &[&str]) -> EvalValue {
    EvalValue::Multi(xs.iter().map(|x| s(x)).collect())
}

struct Env {
    rng: SeededRng,
    roles: Vec<AppRoleValue>,
    used: UsedValues,
    domain: Option<String>,
}

impl Env {
    fn new(seed: u64) -> Env {
        Env {
            rng: SeededRng::from_seed(seed),
            roles: Vec::new(),
            used: UsedValues::new(),
            domain: None,
        }
    }

    fn call_pre(
        &mut self,
        f: Function,
        args: &[Option<EvalValue>],
        pre: &Precompiled,
    ) -> EvalResult<EvalValue> {
        let used = &self.used;
        let oracle = |v: &str| used.is_unique(v);
        let mut ctx = EvalContext {
            now: Utc.with_ymd_and_hms(2024, 6, 15, 10, 30, 0).unwrap(),
            rng: &mut self.rng,
            default_domain: self.domain.as_deref(),
            app_role_assignments: &self.roles,
            is_unique: &oracle,
        };
        call(f, args, pre, &mut ctx)
    }

    fn call(&mut self, f: Function, args: &[EvalValue]) -> EvalResult<EvalValue> {
        let args: Vec<Option<EvalValue>> = args.iter().cloned().map(Some).collect();
        self.call_pre(f, &args, &Precompiled::default())
    }
}

fn lits(args: &[Option<EvalValue>]) -> Vec<Option<Option<&EvalValue>>> {
    args.iter().map(|a| a.as_ref().map(Some)).collect()
}

#[test]
fn random_string_places_every_minimum() {
    for seed in 0..50 {
        let mut env = Env::new(seed);
        let out = env
            .call(
                Function::RandomString,
                &[i(12), i(2), i(3), i(1), i(4), s("0Oo1lI")],
            )
            .unwrap();
        let EvalValue::String(out) = out else {
            panic!()
        };
        assert_eq!(out.chars().count(), 12);
        let count = |p: fn(&char) -> bool| out.chars().filter(p).count();
        assert!(count(|c| c.is_ascii_digit()) >= 2, "{out}");
        assert!(count(|c| SPECIAL.contains(*c)) >= 3, "{out}");
        assert!(count(|c| c.is_ascii_uppercase()) >= 1, "{out}");
        assert!(count(|c| c.is_ascii_lowercase()) >= 4, "{out}");
        assert!(!out.chars().any(|c| "0Oo1lI".contains(c)), "{out}");
    }
}

#[test]
fn random_string_extras_come_from_classes_with_minimums() {
    let mut env = Env::new(3);
    for _ in 0..20 {
        let EvalValue::String(out) = env
            .call(Function::RandomString, &[i(30), i(1), i(0), i(0), i(1)])
            .unwrap()
        else {
            panic!()
        };
        assert!(
            out.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()),
            "{out}"
        );
    }
    // All minimums zero: any class.
    let mut seen = [false; 4];
    for _ in 0..20 {
        let EvalValue::String(out) = env
            .call(Function::RandomString, &[i(40), i(0), i(0), i(0), i(0)])
            .unwrap()
        else {
            panic!()
        };
        for c in out.chars() {
            seen[if c.is_ascii_digit() {
                0
            } else if c.is_ascii_uppercase() {
                2
            } else if c.is_ascii_lowercase() {
                3
            } else {
                1
            }] = true;
        }
    }
    assert_eq!(seen, [true; 4]);
}

#[test]
fn seeded_functions_are_deterministic_and_advance() {
    let run = |seed| {
        let mut env = Env::new(seed);
        (
            env.call(Function::Guid, &[]).unwrap(),
            env.call(Function::Guid, &[]).unwrap(),
            env.call(Function::RandomString, &[i(16), i(1), i(1), i(1), i(1)])
                .unwrap(),
        )
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a.0, a.1, "each Guid() call returns a new value");
    assert_ne!(a, run(43));
}

#[test]
fn precompile_reports_invalid_literals() {
    let cases: Vec<(Function, Vec<Option<EvalValue>>, u16)> = vec![
        (
            Function::DateAdd,
            vec![Some(s("q")), Some(i(1)), None],
            codes::INVALID_INTERVAL,
        ),
        (
            Function::DateDiff,
            vec![Some(s("YYYY")), None, None],
            codes::INVALID_INTERVAL,
        ),
        (
            Function::ToUpper,
            vec![None, Some(s("en_US"))],
            codes::INVALID_CULTURE,
        ),
        (
            Function::Replace,
            vec![Some(s("x")), None, Some(s("(?<=a)b")), None, Some(s("y"))],
            codes::INVALID_REGEX,
        ),
        (
            Function::Replace,
            vec![
                Some(s("x")),
                None,
                Some(s("(?<g>a)")),
                Some(s("h")),
                Some(s("y")),
            ],
            codes::UNKNOWN_GROUP,
        ),
        (
            Function::Replace,
            vec![Some(s("x")), Some(s("a"))],
            codes::INVALID_REPLACE_MODE,
        ),
        (
            Function::RandomString,
            vec![Some(i(4)), Some(i(2)), Some(i(2)), Some(i(0)), Some(i(1))],
            codes::INVALID_RANDOM_STRING,
        ),
        (
            Function::FormatDateTime,
            vec![None, Some(s("'x"))],
            codes::INVALID_FORMAT,
        ),
        (
            Function::FormatDateTime,
            vec![None, Some(s("Bogus")), Some(s("yyyy")), Some(s("yyyy"))],
            codes::INVALID_DATETIME_STYLES,
        ),
        (
            Function::InStr,
            vec![None, None, Some(i(0))],
            codes::INVALID_START,
        ),
        (
            Function::InStr,
            vec![None, None, None, Some(s("vbDatabaseCompare"))],
            codes::INVALID_COMPARE_TYPE,
        ),
        (
            Function::Split,
            vec![None, Some(s(""))],
            codes::EMPTY_DELIMITER,
        ),
        (
            Function::Split,
            vec![None, Some(EvalValue::Null)],
            codes::NULL_CONTROL,
        ),
        (
            Function::Item,
            vec![None, Some(i(0))],
            codes::INDEX_OUT_OF_RANGE,
        ),
        (
            Function::Left,
            vec![None, Some(s("two"))],
            codes::NOT_AN_INTEGER,
        ),
        (Function::Now, vec![None], codes::ARGUMENT_COUNT),
    ];
    for (f, args, code) in cases {
        // None here means "run-time value" for the test's convenience.
        let l: Vec<Option<Option<&EvalValue>>> = args.iter().map(|a| Some(a.as_ref())).collect();
        let e = precompile(f, &l).unwrap_err();
        assert_eq!(e.code, code, "{f}: {e}");
        assert!(e.message.starts_with(f.name()), "{e}");
    }
}

#[test]
fn precompiled_artefacts_are_used() {
    // A precompiled output format is used even though the run-time argument differs: proof that
    // call() does not re-parse a format it was given compiled.
    let args = vec![Some(s("2024-01-31")), Some(s("yyyy"))];
    let pre = precompile(Function::FormatDateTime, &lits(&args)).unwrap();
    let mut env = Env::new(0);
    let other = vec![Some(s("2024-01-31")), Some(s("MM"))];
    assert_eq!(
        env.call_pre(Function::FormatDateTime, &other, &pre)
            .unwrap(),
        s("2024")
    );
    // Replace: a precompiled regex is reused.
    let args = vec![Some(s("a1b22")), None, Some(s(r"\d+")), None, Some(s("#"))];
    let pre = precompile(Function::Replace, &lits(&args)).unwrap();
    assert_eq!(pre.replace_mode(), Some(ReplaceMode::Regex));
    let rt = vec![
        Some(s("x9")),
        None,
        Some(EvalValue::Null),
        None,
        Some(s("#")),
    ];
    assert_eq!(env.call_pre(Function::Replace, &rt, &pre).unwrap(), s("x#"));
    // Without precompilation the Null pattern is an error.
    assert_eq!(
        env.call_pre(Function::Replace, &rt, &Precompiled::default())
            .unwrap_err()
            .code,
        codes::NULL_CONTROL
    );
}

#[test]
fn errors_name_function_parameter_and_value() {
    let mut env = Env::new(0);
    let e = env
        .call(Function::Item, &[m(&["a", "b"]), s("x")])
        .unwrap_err();
    assert_eq!(e.code, codes::NOT_AN_INTEGER);
    assert_eq!(e.arg, Some(1));
    assert_eq!(e.message, "Item: index \"x\" is not an integer");
    let e = env
        .call(Function::DateAdd, &[s("d"), i(1), s("soon")])
        .unwrap_err();
    assert_eq!(e.arg, Some(2));
    assert!(
        e.message
            .starts_with("DateAdd: dateTime \"soon\" is not a date/time"),
        "{}",
        e.message
    );
    let e = env.call(Function::Left, &[s("abc")]).unwrap_err();
    assert_eq!(e.code, codes::ARGUMENT_COUNT);
    let e = env
        .call_pre(
            Function::Left,
            &[Some(s("abc")), None],
            &Precompiled::default(),
        )
        .unwrap_err();
    assert_eq!((e.code, e.arg), (codes::ARGUMENT_COUNT, Some(1)));
}

#[test]
fn evaluator_helpers() {
    assert_eq!(iif_condition(&EvalValue::Null).unwrap(), None);
    assert_eq!(iif_condition(&s("True")).unwrap(), Some(true));
    assert_eq!(
        iif_condition(&s("maybe")).unwrap_err().code,
        codes::NOT_BOOLEAN
    );
    assert!(switch_key_matches(&EvalValue::Null, &s("")).unwrap());
    assert!(switch_key_matches(&EvalValue::Boolean(false), &s("False")).unwrap());
    assert!(!switch_key_matches(&s("a"), &s("A")).unwrap());
    assert!(switch_key_matches(&i(10), &s("10")).unwrap());
    let e = switch_key_matches(&s("a"), &m(&["a", "b"])).unwrap_err();
    assert_eq!((e.code, e.arg), (codes::MULTI_VALUED, Some(1)));
    assert!(coalesce_is_value(&s("")));
    assert!(!coalesce_is_value(&EvalValue::Null));
    assert!(is_null_or_empty(&m(&["", ""])));
    assert!(!is_null_or_empty(&s(" ")));

    let mut env = Env::new(0);
    env.used.insert("Taken@Contoso.com");
    let oracle = |v: &str| env.used.is_unique(v);
    let ctx = EvalContext {
        now: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
        rng: &mut env.rng,
        default_domain: None,
        app_role_assignments: &[],
        is_unique: &oracle,
    };
    assert_eq!(
        select_unique_check(&s(""), 0, &ctx).unwrap(),
        UniqueCheck::Skip
    );
    assert_eq!(
        select_unique_check(&EvalValue::Null, 0, &ctx).unwrap(),
        UniqueCheck::Skip
    );
    assert_eq!(
        select_unique_check(&s("taken@contoso.com"), 0, &ctx).unwrap(),
        UniqueCheck::Taken
    );
    assert_eq!(
        select_unique_check(&s("free@contoso.com"), 1, &ctx).unwrap(),
        UniqueCheck::Free(s("free@contoso.com"))
    );
    let e = select_unique_check(&m(&["a", "b"]), 1, &ctx).unwrap_err();
    assert_eq!((e.code, e.arg), (codes::MULTI_VALUED, Some(1)));
    assert_eq!(single_app_role_warning(&ctx), None);
}

#[test]
fn outcome_functions_are_refused() {
    let mut env = Env::new(0);
    for f in [
        Function::IgnoreFlowIfNullOrEmpty,
        Function::SelectUniqueValue,
    ] {
        let args: Vec<EvalValue> = (0..f.arity().min).map(|_| s("a")).collect();
        assert_eq!(env.call(f, &args).unwrap_err().code, codes::EVALUATOR_OWNED);
    }
}

#[test]
fn single_app_role_picks_smallest_and_warns() {
    let mut env = Env::new(0);
    env.roles = vec![
        AppRoleValue {
            id: "2".into(),
            value: "User".into(),
            display_name: "U".into(),
        },
        AppRoleValue {
            id: "1".into(),
            value: "Admin".into(),
            display_name: "A".into(),
        },
    ];
    assert_eq!(
        env.call(Function::SingleAppRoleAssignment, &[EvalValue::Null])
            .unwrap(),
        s("Admin")
    );
    let oracle = |_: &str| true;
    let ctx = EvalContext {
        now: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
        rng: &mut env.rng,
        default_domain: None,
        app_role_assignments: &env.roles,
        is_unique: &oracle,
    };
    assert!(single_app_role_warning(&ctx)
        .unwrap()
        .contains("2 app role assignments"));
}

#[test]
fn replace_mode_precedence() {
    let sel = |slots: &[usize]| {
        let mut v = [false; 7];
        for &s in slots {
            v[s] = true;
        }
        replace_mode(&v)
    };
    assert_eq!(sel(&[0, 1, 4, 6]).unwrap(), ReplaceMode::Template);
    assert_eq!(sel(&[0, 2, 3, 4, 5]).unwrap(), ReplaceMode::Fallback);
    assert_eq!(sel(&[0, 2, 3, 4]).unwrap(), ReplaceMode::Group);
    assert_eq!(sel(&[0, 1, 2, 4]).unwrap(), ReplaceMode::Regex);
    assert_eq!(sel(&[0, 1, 4]).unwrap(), ReplaceMode::Plain);
    assert_eq!(
        sel(&[0, 2, 3]).unwrap_err().code,
        codes::INVALID_REPLACE_MODE
    );
    assert_eq!(sel(&[0, 6]).unwrap_err().code, codes::INVALID_REPLACE_MODE);
}

#[test]
fn replace_group_leaves_non_participating_matches() {
    let mut env = Env::new(0);
    let args = [
        s("a1 b c2"),
        EvalValue::Null,
        s(r"(?<l>[a-z])(?<d>\d)?"),
        s("d"),
        s("[$0]"),
    ];
    let mut a: Vec<Option<EvalValue>> = args.iter().cloned().map(Some).collect();
    a[1] = None;
    let out = env
        .call_pre(Function::Replace, &a, &Precompiled::default())
        .unwrap();
    assert_eq!(out, s("a[a1] b c[c2]"));
}

fn arb_value() -> impl Strategy<Value = EvalValue> {
    let leaf = prop_oneof![
        Just(EvalValue::Null),
        ".{0,12}".prop_map(EvalValue::from),
        prop_oneof![
            Just("yyyy".to_string()),
            Just("d".to_string()),
            Just("-1".to_string()),
            Just("2024-02-29T12:00:00Z".to_string()),
            Just("vbTextCompare".to_string()),
            Just("(?<g>a)".to_string()),
            Just("$1".to_string()),
            Just("tr-TR".to_string()),
            Just("".to_string()),
            Just("MMMM dd, yyyy HH:mm:ss.fffzzz".to_string())
        ]
        .prop_map(EvalValue::from),
        any::<i64>().prop_map(EvalValue::Integer),
        (-300i64..300).prop_map(EvalValue::Integer),
        (any::<i64>(), 0u32..30).prop_map(
            |(m, s)| Decimal::new(i128::from(m), s).map_or(EvalValue::Null, EvalValue::Decimal)
        ),
        any::<bool>().prop_map(EvalValue::Boolean),
        (-62_000_000_000i64..253_000_000_000).prop_map(|t| Utc
            .timestamp_opt(t, 0)
            .single()
            .map_or(EvalValue::Null, EvalValue::DateTime)),
        ".{0,8}".prop_map(|s: String| EvalValue::Reference(s.into())),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(EvalValue::Binary),
        Just(EvalValue::Structured(vec![AppRoleValue {
            id: "1".into(),
            value: "v".into(),
            display_name: "d".into()
        }])),
    ];
    prop_oneof![
        4 => leaf.clone(),
        1 => proptest::collection::vec(leaf, 0..4).prop_map(EvalValue::multi),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_function_panics(
        fi in 0usize..46,
        args in proptest::collection::vec(proptest::option::weighted(0.85, arb_value()), 0..8),
        literal_mask in any::<u8>(),
        seed in any::<u64>(),
    ) {
        let f = Function::ALL[fi];
        let mut env = Env::new(seed);
        env.domain = Some("contoso.com".into());
        let l: Vec<Option<Option<&EvalValue>>> = args
            .iter()
            .enumerate()
            .map(|(k, a)| a.as_ref().map(|v| (literal_mask >> (k % 8) & 1 == 1).then_some(v)))
            .collect();
        let pre = precompile(f, &l).unwrap_or_default();
        if let Err(e) = env.call_pre(f, &args, &pre) {
            prop_assert!((300..400).contains(&e.code));
            prop_assert!(!e.message.is_empty());
        }
        for (a, b) in args.iter().zip(args.iter().skip(1)) {
            if let (Some(a), Some(b)) = (a, b) {
                for op in [crate::rules::value::CompareOp::Eq, crate::rules::value::CompareOp::Lt] {
                    let _ = crate::rules::value::compare(op, a, b);
                }
                let _ = switch_key_matches(a, b);
            }
        }
    }

    #[test]
    fn date_text_and_formats_never_panic(text in ".{0,30}", format in "[yMdHhmsfFtzK:/ .'\\\\%-]{0,12}") {
        let _ = datetime::parse_text(&text);
        if let Ok(fm) = DotNetFormat::parse(&format) {
            let _ = fm.parse_input(&text);
            let dt = Utc.with_ymd_and_hms(2024, 2, 29, 13, 4, 5).unwrap().fixed_offset();
            let rendered = fm.render(dt);
            // What rendering produces, parsing accepts (when the format carries no ambiguity).
            let _ = fm.parse_input(&rendered);
        }
    }
}

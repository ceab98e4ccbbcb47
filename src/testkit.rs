//! Test support for this crate and downstream crates (feature `testkit`): a ready-made
//! projection for users and groups, a deterministic directory generator, [`scale`]: an AD-like
//! LDIF export of any size for benchmarks, and [`servers`]: real servers (ports, a throwaway
//! CA, child processes) for tests that talk to them.

#[cfg(feature = "ldap")]
pub mod samba;
pub mod scale;
pub mod servers;
#[cfg(feature = "ldap")]
pub mod slapd;

use crate::delta::{
    Deprovision, DeprovisionCause, Desired, Flow, JoinGroup, Link, Links, Plan, PlanInput,
    Projected, Projection, ProjectionContext, SourceMirror, TargetMirror, WhenEmpty,
};
use smol_str::SmolStr;

use crate::model::{Anchor, AttrName, Dn, Entry, ObjectType, Reference, TargetId, Value, Values};

/// A projection of source `user` and `group` entries onto target `User` and `Group` objects.
///
/// * Users are in scope unless their `department` is in [`UserGroupProjection::excluded_departments`];
///   every attribute except those in `skip` flows to the target under the same name; `cn` also
///   flows to `displayName`; `initialPassword` flows on create only, redacted. Users join on
///   `mail` then on `employeeId`.
/// * Groups are always in scope; `member` is a multi-valued reference flow; groups join on
///   `displayName` = `cn`.
/// * Users leaving scope are disabled (`accountEnabled = false`); groups are deleted.
#[derive(Debug, Clone)]
pub struct UserGroupProjection {
    /// Departments whose users are out of scope.
    pub excluded_departments: Vec<String>,
    /// Source attributes that do not flow.
    pub skip: Vec<AttrName>,
}

impl Default for UserGroupProjection {
    fn default() -> Self {
        UserGroupProjection {
            excluded_departments: vec!["Former".into()],
            skip: vec![
                "member".into(),
                "initialPassword".into(),
                "objectClass".into(),
            ],
        }
    }
}

impl Projection for UserGroupProjection {
    fn join_attributes(
        &self,
    ) -> Option<std::collections::BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>>> {
        Some(
            [
                ("Group", &["displayName"][..]),
                ("User", &["mail", "employeeId"][..]),
            ]
            .into_iter()
            .map(|(ty, attrs)| (ty.into(), attrs.iter().map(|a| (*a).into()).collect()))
            .collect(),
        )
    }

    fn project(&self, e: &Entry, _ctx: &ProjectionContext<'_>) -> Projected {
        if e.object_type.is("group") {
            let cn = e.get("cn").cloned().unwrap_or_default();
            let members = e.get("member").cloned().unwrap_or_default();
            let mut d = Desired::new("Group")
                .flow(Flow::new("displayName", cn.clone()))
                .flow(Flow::multi("member", members));
            if let Some(v) = cn.first() {
                d = d.join_on(JoinGroup::on("displayName", v.clone()));
            }
            return Projected::InScope(d);
        }
        if !e.object_type.is("user") {
            return Projected::OutOfScope(format!(
                "object type {} is not synchronized",
                e.object_type
            ));
        }
        // One pass over the (sorted) attributes finds the special ones and builds the flows;
        // a user left out of scope drops them.
        let mut d = Desired::new(ObjectType::new(SmolStr::new_static("User")));
        d.flows.reserve(e.attributes.len() + 2);
        let (mut cn, mut password, mut mail, mut employee_id) = (None, None, None, None);
        // Names of different lengths differ when both are ASCII: most comparisons stop there.
        let skip_ascii = self.skip.iter().all(|s| s.as_str().is_ascii());
        for (name, values) in e.attributes.iter() {
            let ascii = name.as_str().is_ascii();
            let may_be = |other: &str| !ascii || other.len() == name.as_str().len();
            match special(name, ascii) {
                Some(Special::Cn) => cn = Some(values),
                Some(Special::Mail) => mail = values.first(),
                Some(Special::Department) => {
                    if let Some(dep) = values.first().and_then(Value::as_str) {
                        if self.excluded_departments.iter().any(|x| x == dep) {
                            return Projected::OutOfScope(format!("department is {dep}"));
                        }
                    }
                }
                Some(Special::EmployeeId) => employee_id = values.first(),
                Some(Special::InitialPassword) => password = Some(values),
                None => {}
            }
            if self
                .skip
                .iter()
                .any(|s| (!skip_ascii || may_be(s.as_str())) && s == name)
            {
                continue;
            }
            let mut f = Flow::new(name.clone(), values.clone());
            f.multi = values.len() > 1 || (may_be("proxyAddresses") && name.is("proxyAddresses"));
            if values.first().is_some_and(Value::is_reference) {
                // A reference whose object is gone must not stay in the target.
                f.when_empty = WhenEmpty::Clear;
            }
            d.flows.push(f);
        }
        if let Some(cn) = cn {
            d.flows.push(Flow::new(name("displayName"), cn.clone()));
        }
        d.flows
            .push(Flow::new(name("accountEnabled"), Values::one(true)));
        if let Some(p) = password {
            d.flows.push(
                Flow::new(name("password"), p.clone())
                    .on_create()
                    .redacted(),
            );
        }
        d.join.reserve(2);
        if let Some(mail) = mail {
            d.join.push(JoinGroup::on(name("mail"), mail.clone()));
        }
        if let Some(id) = employee_id {
            d.join.push(JoinGroup::on(name("employeeId"), id.clone()));
        }
        Projected::InScope(d)
    }

    fn unchanged(
        &self,
        e: &Entry,
        current: &crate::model::TargetObject,
        _ctx: &ProjectionContext<'_>,
    ) -> Option<bool> {
        if !e.object_type.is("user") || !current.object_type.is("User") {
            return None;
        }
        // The same walk as `project`, comparing instead of building flows.
        let skip_ascii = self.skip.iter().all(|s| s.as_str().is_ascii());
        let mut cn = None;
        let mut hint = 0;
        for (name, values) in e.attributes.iter() {
            let ascii = name.as_str().is_ascii();
            let may_be = |other: &str| !ascii || other.len() == name.as_str().len();
            match special(name, ascii) {
                Some(Special::Cn) => cn = Some(values),
                Some(Special::Department) => {
                    if let Some(dep) = values.first().and_then(Value::as_str) {
                        if self.excluded_departments.iter().any(|x| x == dep) {
                            return Some(false);
                        }
                    }
                }
                _ => {}
            }
            if self
                .skip
                .iter()
                .any(|s| (!skip_ascii || may_be(s.as_str())) && s == name)
            {
                continue;
            }
            let have = current.attributes.get_hinted(name, &mut hint);
            if !have.is_some_and(|h| values.same_set(h, false)) {
                return Some(false);
            }
        }
        let holds = |n: &str, want: &Values| {
            current
                .attributes
                .get(n)
                .is_some_and(|h| want.same_set(h, false))
        };
        if cn.is_some_and(|cn| !holds("displayName", cn))
            || !holds("accountEnabled", &Values::one(true))
        {
            return Some(false);
        }
        Some(true)
    }

    /// Users are disabled (`accountEnabled = false`, set back by the flow), whatever the cause;
    /// other objects deleted.
    fn deprovision(
        &self,
        link: &Link,
        _entry: Option<&Entry>,
        _cause: DeprovisionCause,
    ) -> Deprovision {
        if link.target_type.is("User") {
            Deprovision::disable([(name("accountEnabled"), false)])
        } else {
            Deprovision::Delete
        }
    }
}

/// An attribute name spelled by a constant (no copy).
fn name(s: &'static str) -> AttrName {
    AttrName::new(SmolStr::new_static(s))
}

/// The source attributes [`UserGroupProjection`] treats specially.
#[derive(Clone, Copy)]
enum Special {
    Cn,
    Mail,
    Department,
    EmployeeId,
    InitialPassword,
}

/// Which special attribute `name` is (ignoring case). ASCII names (`ascii`) are told apart by
/// length first; others (which may fold to ASCII) are compared with each.
fn special(name: &AttrName, ascii: bool) -> Option<Special> {
    const ALL: [(&str, Special); 5] = [
        ("cn", Special::Cn),
        ("mail", Special::Mail),
        ("department", Special::Department),
        ("employeeId", Special::EmployeeId),
        ("initialPassword", Special::InitialPassword),
    ];
    let n = name.as_str();
    ALL.iter()
        .find(|(s, _)| (!ascii || s.len() == n.len()) && name.is(s))
        .map(|(_, k)| *k)
}

/// A small deterministic pseudo-random sequence (SplitMix64) for generated fixtures.
#[derive(Debug, Clone)]
pub struct Fixture(u64);

impl Fixture {
    /// A sequence from `seed`.
    pub fn new(seed: u64) -> Fixture {
        Fixture(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

const DEPARTMENTS: [&str; 6] = [
    "Engineering",
    "Sales",
    "Finance",
    "Support",
    "Legal",
    "Former",
];

/// A generated user: `cn`, `mail`, `employeeId`, `department` and filler attributes up to
/// `attributes` in all, under `ou=People,dc=example,dc=com`.
pub fn user(i: usize, attributes: usize, fx: &mut Fixture) -> Entry {
    let dept = DEPARTMENTS[(fx.below(DEPARTMENTS.len() as u64 - 1)) as usize];
    let cn = format!("User {i:07}");
    let mut e = Entry::new(format!("u-{i:07}"), "user")
        .with_dn(user_dn(i))
        .with("cn", cn.as_str())
        .with("mail", format!("user{i}@example.com"))
        .with("employeeId", format!("E{i:07}"))
        .with("department", dept);
    let mut n = 4;
    while n < attributes {
        e.attributes.add(
            format!("extensionAttribute{n}"),
            format!("value {n} of {i}"),
        );
        n += 1;
    }
    e
}

/// The DN of generated user `i`.
pub fn user_dn(i: usize) -> Dn {
    Dn::parse(&format!("cn=User {i:07},ou=People,dc=example,dc=com")).unwrap_or_default()
}

/// A generated group with `members` user members (by DN), chosen from `users` users.
pub fn group(i: usize, members: usize, users: usize, fx: &mut Fixture) -> Entry {
    let mut vals: Vec<Value> = (0..members)
        .map(|_| Value::dn_ref(user_dn(fx.below(users as u64) as usize)))
        .collect();
    vals.sort();
    vals.dedup();
    Entry::new(format!("g-{i:07}"), "group")
        .with_dn(
            Dn::parse(&format!("cn=Group {i:07},ou=Groups,dc=example,dc=com")).unwrap_or_default(),
        )
        .with("cn", format!("Group {i:07}"))
        .with_values("member", Values::from(vals))
}

/// A generated directory: `users` users with `attributes` attributes each and `groups` groups
/// of up to `members` members, from `seed`.
pub fn directory(
    users: usize,
    attributes: usize,
    groups: usize,
    members: usize,
    seed: u64,
) -> Vec<Entry> {
    let mut fx = Fixture::new(seed);
    let mut out: Vec<Entry> = (0..users).map(|i| user(i, attributes, &mut fx)).collect();
    out.extend((0..groups).map(|i| group(i, members, users.max(1), &mut fx)));
    out
}

pub use crate::connector::{export_sequential as export, ExportReport};

/// A projection with its [`Projection::unchanged`] fast path turned off: the planner projects
/// every object, then compares. For tests and benchmarks of a fast path against the plain way.
pub struct Projecting<'a>(pub &'a dyn Projection);

impl Projection for Projecting<'_> {
    fn project(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
        self.0.project(entry, ctx)
    }
    fn deprovision(
        &self,
        link: &Link,
        entry: Option<&Entry>,
        cause: DeprovisionCause,
    ) -> Deprovision {
        self.0.deprovision(link, entry, cause)
    }
}

/// Applies `plan` to the links and the target mirror as a target that accepts every operation
/// would: each operation is recorded with the id the target would give it (`id-<anchor>` for a
/// create, `id-<anchor>-2`, `-3`, … when that id is taken — a changed target type creates a new
/// object while the old one still stands); one that sends nothing (an unlink, a join without changes) only changes the links.
/// Operations that do not translate (a reference to an object never linked) are skipped. The
/// plan's guard violations are not looked at: everything is applied.
pub fn apply_accepted(plan: &Plan, links: &mut Links, target: &mut TargetMirror) {
    for op in &plan.operations {
        match op.to_target_operation(links) {
            Ok(Some(top)) => {
                let id = match top.id() {
                    Some(id) => id.clone(),
                    None => {
                        let mut id = TargetId::new(format!("id-{}", op.anchor));
                        let mut n = 1;
                        while target.get(&id).is_some() {
                            n += 1;
                            id = TargetId::new(format!("id-{}-{n}", op.anchor));
                        }
                        id
                    }
                };
                target.record(&top, &id);
                links.record(op, Some(&id));
            }
            Ok(None) => links.record(op, None),
            Err(_) => {}
        }
    }
}

/// Plans and applies ([`apply_accepted`], guard violations included) until a plan has nothing
/// left to do: the links and target mirror of a converged system. Returns how many plans were
/// applied, or the last plan when it had issues or still had operations after `max_rounds`.
pub fn converge(
    projection: &dyn Projection,
    mirror: &SourceMirror,
    links: &mut Links,
    target: &mut TargetMirror,
    max_rounds: usize,
) -> Result<usize, Box<Plan>> {
    let mut rounds = 0;
    loop {
        let plan = crate::delta::plan(&PlanInput::new(projection, mirror, links, target));
        if plan.operations.is_empty() && plan.issues.is_empty() {
            return Ok(rounds);
        }
        if !plan.issues.is_empty() || rounds == max_rounds {
            return Err(Box::new(plan));
        }
        apply_accepted(&plan, links, target);
        rounds += 1;
    }
}

/// The target id a reference value names, for assertions on target state.
pub fn target_ref(v: &Value) -> Option<&TargetId> {
    match v {
        Value::Reference(Reference::Target(id)) => Some(id),
        _ => None,
    }
}

/// Shorthand for an anchor.
pub fn anchor(s: &str) -> Anchor {
    Anchor::new(s)
}

/// Shorthand for an object type.
pub fn object_type(s: &str) -> ObjectType {
    ObjectType::new(s)
}

const COMPANIES: [&str; 4] = [
    "Contoso",
    "Fabrikam Inc",
    "Northwind Traders Ltd",
    "Litware",
];
const GIVEN: [&str; 8] = [
    "Ada",
    "Grace",
    "Alan",
    "Katherine",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
];
const SURNAMES: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Johnson", "Dijkstra", "Liskov", "Knuth", "Allen",
];

/// `n` generated AD users ([`ad_user`]) whose managers are users of the same set: user `i`'s
/// manager is user `i / span` (user 0 has none; a `span` under 2 counts as 2, so nobody
/// manages themselves), so `manager` references resolve.
pub fn ad_users_managed(n: usize, span: usize, fx: &mut Fixture) -> Vec<Entry> {
    let mut users: Vec<Entry> = (0..n).map(|i| ad_user(i, fx)).collect();
    for i in 1..n {
        if let Some(boss) = users.get(i / span.max(2)).and_then(|b| b.dn.clone()) {
            users[i].attributes.set("manager", Value::dn_ref(boss));
        }
    }
    users
}

/// A generated Active Directory user as an LDAP source presents it: objectGUID (as its GUID
/// string), userPrincipalName, sAMAccountName, names, mail (absent for one user in five),
/// userAccountControl (one in ten disabled), department, company, title, telephoneNumber,
/// employeeID, extensionAttribute1 (`CC1234-Dept`), whenCreated (generalized time) and manager.
pub fn ad_user(i: usize, fx: &mut Fixture) -> Entry {
    let given = GIVEN[(i + fx.below(3) as usize) % GIVEN.len()];
    let sn = SURNAMES[(i / GIVEN.len() + fx.below(5) as usize) % SURNAMES.len()];
    let sam = format!("{}{}{i}", &given[..1].to_lowercase(), sn.to_lowercase());
    let dept = DEPARTMENTS[(fx.below(DEPARTMENTS.len() as u64 - 1)) as usize];
    let guid = uuid::Uuid::from_u64_pair(
        0x5f0c_0000_0000_4000 | i as u64,
        0x8000_0000_0000_0000 | fx.next_u64() >> 2,
    );
    let mut e = Entry::new(Anchor::from_guid(guid), "user")
        .with_dn(
            Dn::parse(&format!(
                "CN={given} {sn} {i},OU={dept},OU=Users,DC=corp,DC=contoso,DC=com"
            ))
            .unwrap_or_default(),
        )
        .with("objectGUID", guid.to_string())
        .with("userPrincipalName", format!("{sam}@corp.contoso.com"))
        .with("sAMAccountName", sam.as_str())
        .with("givenName", given)
        .with("sn", sn)
        .with(
            "userAccountControl",
            if i % 10 == 7 { 514i64 } else { 512i64 },
        )
        .with("department", dept)
        .with("company", COMPANIES[i % COMPANIES.len()])
        .with("title", "Engineer")
        .with("telephoneNumber", format!("+1 425 555 {:04}", i % 10_000))
        .with("employeeID", format!("{:06}", i))
        .with(
            "extensionAttribute1",
            format!("CC{:04}-{dept}", i % 9000 + 1000),
        )
        .with(
            "whenCreated",
            format!("2024{:02}{:02}093000.0Z", i % 12 + 1, i % 28 + 1),
        );
    if i % 5 != 0 {
        e.attributes.add(
            "mail",
            format!("{}.{}@contoso.com", given.to_lowercase(), sn.to_lowercase()),
        );
    }
    if i > 0 {
        let boss = i / 10;
        e.attributes.add(
            "manager",
            Value::dn_ref(
                Dn::parse(&format!(
                    "CN=Manager {boss},OU=Users,DC=corp,DC=contoso,DC=com"
                ))
                .unwrap_or_default(),
            ),
        );
    }
    e
}

//! A scale fixture: a deterministic Active Directory export of any size, in the shape of
//! `examples/data/corp.ldif` (ldifde style, RFC 2849 content records, `objectGUID` as GUID
//! text), and the same export after a share of edits — for benchmarks such as
//! `examples/scale.rs` and for downstream crates that want to measure their own setup.
//!
//! Everything is computed from the user's number and the seed: the writers stream to any
//! [`Write`] and keep nothing per object, so an export of a million users costs no memory.
//!
//! The export of [`ScaleExport::new`]`(n)` holds:
//! * an OU tree: `OU=Staff` with 8 department OUs of 4 region OUs each, and `OU=Groups`
//!   (42 OUs, which a source mapping only users and groups skips);
//! * `n` users with 20 attributes each (`objectClass` ×4, `cn`, `objectGUID`,
//!   `sAMAccountName`, `userPrincipalName`, `givenName`, `sn`, `displayName`, `mail`,
//!   `department`, `title`, `company`, `telephoneNumber`, `employeeID`, `extensionAttribute1`,
//!   `whenCreated`, `userAccountControl`) and a `manager` (a DN) for every user but the first:
//!   user `i` reports to user `(i - 1) / 10`, a tree ten wide;
//! * `⌈n / 1000⌉` team groups of up to 1,000 members (users `1000 g ..= 1000 g + 999`) and one
//!   group `All Staff` holding every second user, at most 50,000 of them: 101 groups at
//!   100,000 users; `member` values are DNs.
//!
//! [`ScaleExport::write_edited`] writes the same export after [`Edits`]: one user in
//! [`Edits::one_in`] (100 by default: 1 %) is touched, as a cycle of ten: one deleted, one
//! joined by a new user (an add), eight changed (a title, a phone number, a department, the
//! account disabled or enabled, or a new manager). The groups follow: deleted users leave their
//! groups, new users join a team group and `All Staff`.

use std::io::{self, BufWriter, Write};

/// A deterministic AD-like export of `users` users and their groups. See the
/// [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleExport {
    /// Users in the export.
    pub users: usize,
    /// The seed of names, departments, GUIDs and the other values.
    pub seed: u64,
    /// Members of a team group (the last may have fewer).
    pub group_size: usize,
    /// Members of the large group `All Staff` (every second user, at most this many).
    pub big_group: usize,
}

/// Which users an edited export changes, deletes and adds (see [`ScaleExport::write_edited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edits {
    /// The seed choosing which users are touched, how, and the new values.
    pub seed: u64,
    /// One user in this many is touched (100: 1 %).
    pub one_in: usize,
}

impl Edits {
    /// 1 % edits chosen by `seed`.
    pub fn new(seed: u64) -> Edits {
        Edits { seed, one_in: 100 }
    }
}

/// What a writer wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Organizational units.
    pub ous: usize,
    /// Users.
    pub users: usize,
    /// Groups.
    pub groups: usize,
    /// `member` values of all groups.
    pub members: usize,
    /// Users with a `manager`.
    pub managed: usize,
    /// Bytes.
    pub bytes: u64,
}

impl Written {
    /// Users and groups: the objects a source mapping both imports.
    pub fn objects(&self) -> usize {
        self.users + self.groups
    }
}

/// What [`ScaleExport::write_edited`] wrote and changed against [`ScaleExport::write`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Edited {
    /// The export written.
    pub written: Written,
    /// Users whose attributes changed.
    pub changed: usize,
    /// Users deleted.
    pub deleted: usize,
    /// Users added.
    pub added: usize,
    /// Groups whose members changed.
    pub groups_changed: usize,
}

impl Edited {
    /// Users touched: changed, deleted and added.
    pub fn users_touched(&self) -> usize {
        self.changed + self.deleted + self.added
    }
}

const BASE: &str = "DC=corp,DC=contoso,DC=com";

const DEPARTMENTS: [(&str, u32); 8] = [
    ("Engineering", 1200),
    ("Sales", 2100),
    ("Finance", 3300),
    ("HR", 4100),
    ("Research", 5500),
    ("Marketing", 6200),
    ("Support", 7400),
    ("Operations", 8800),
];

const REGIONS: [&str; 4] = ["Americas", "Europe", "Asia Pacific", "Africa"];

const TITLES: [&str; 6] = [
    "Associate",
    "Specialist",
    "Senior Specialist",
    "Lead",
    "Manager",
    "Director",
];

const GIVEN: [&str; 32] = [
    "Ada",
    "Alan",
    "Barbara",
    "Claude",
    "Donald",
    "Edsger",
    "Frances",
    "Grace",
    "Hedy",
    "Ivan",
    "John",
    "Katherine",
    "Leslie",
    "Margaret",
    "Niklaus",
    "Ole",
    "Radia",
    "Shafi",
    "Tim",
    "Vint",
    "Whitfield",
    "Adele",
    "Butler",
    "Carl",
    "Dorothy",
    "Elena",
    "Fernando",
    "Gordon",
    "Hal",
    "Irene",
    "Jean",
    "Ken",
];

const SURNAMES: [&str; 32] = [
    "Lovelace",
    "Turing",
    "Liskov",
    "Shannon",
    "Knuth",
    "Dijkstra",
    "Allen",
    "Hopper",
    "Lamarr",
    "Sutherland",
    "Backus",
    "Johnson",
    "Lamport",
    "Hamilton",
    "Wirth",
    "Dahl",
    "Perlman",
    "Goldwasser",
    "Lee",
    "Cerf",
    "Diffie",
    "Goldberg",
    "Lampson",
    "Hewitt",
    "Vaughan",
    "Garcia",
    "Corbato",
    "Moore",
    "Abelson",
    "Greif",
    "Sammet",
    "Thompson",
];

/// The SplitMix64 finalizer: a bijection on `u64` that scatters its input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const TAG_USER: u64 = 1 << 56;
const TAG_GROUP: u64 = 2 << 56;

/// A user's values, computed from its number.
struct User {
    i: usize,
    given: &'static str,
    sn: &'static str,
    department: usize,
    region: usize,
    title: String,
    company: &'static str,
    phone: u64,
    created: u64,
    account_control: u32,
    manager: Option<usize>,
}

/// How an edited export treats a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Kept,
    Deleted,
    /// Unchanged, and followed by new user `n + j`.
    Spawns,
    Changed,
}

/// The choices of one edited export, computed per user.
struct Selection {
    n: usize,
    seed: u64,
    one_in: usize,
    offset: usize,
    rotation: usize,
}

impl Selection {
    fn new(n: usize, edits: &Edits) -> Selection {
        let one_in = edits.one_in.max(1);
        let h = mix(edits.seed ^ 0x5eed_ed17);
        Selection {
            n,
            seed: edits.seed,
            one_in,
            offset: (h % one_in as u64) as usize,
            rotation: ((h >> 32) % 10) as usize,
        }
    }

    /// The slot number of user `i` when it is touched.
    fn slot(&self, i: usize) -> Option<usize> {
        (i < self.n && i >= self.offset && (i - self.offset) % self.one_in == 0)
            .then(|| (i - self.offset) / self.one_in)
    }

    fn fate(&self, i: usize) -> Fate {
        match self.slot(i).map(|k| (k + self.rotation) % 10) {
            None => Fate::Kept,
            // A user with reports is changed instead: no one loses a manager.
            Some(0) if has_reports(i, self.n) => Fate::Changed,
            Some(0) => Fate::Deleted,
            Some(1) => Fate::Spawns,
            Some(_) => Fate::Changed,
        }
    }

    fn deleted(&self, i: usize) -> bool {
        self.fate(i) == Fate::Deleted
    }

    /// Slots in all.
    fn slots(&self) -> usize {
        if self.n > self.offset {
            (self.n - self.offset - 1) / self.one_in + 1
        } else {
            0
        }
    }

    /// The first slot whose user spawns a new one.
    fn first_spawn(&self) -> usize {
        (11 - self.rotation) % 10
    }

    /// New users in all.
    fn added(&self) -> usize {
        let (k, slots) = (self.first_spawn(), self.slots());
        if slots > k {
            (slots - k - 1) / 10 + 1
        } else {
            0
        }
    }

    /// Which change a changed user gets (0..5).
    fn variant(&self, i: usize) -> u64 {
        mix(self.seed ^ TAG_USER ^ i as u64) % 5
    }
}

fn has_reports(i: usize, n: usize) -> bool {
    i.saturating_mul(10).saturating_add(1) < n
}

/// A writer counting the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ScaleExport {
    /// An export of `users` users with seed 1, team groups of 1,000 and a `All Staff` group of
    /// at most 50,000.
    pub fn new(users: usize) -> ScaleExport {
        ScaleExport {
            users,
            seed: 1,
            group_size: 1000,
            big_group: 50_000,
        }
    }

    /// The same export with another seed.
    pub fn with_seed(mut self, seed: u64) -> ScaleExport {
        self.seed = seed;
        self
    }

    /// Team groups: `⌈users / group_size⌉`.
    pub fn team_groups(&self) -> usize {
        self.users.div_ceil(self.group_size.max(1))
    }

    /// Groups in all: the team groups and `All Staff`.
    pub fn groups(&self) -> usize {
        self.team_groups() + 1
    }

    /// Writes the export to `out` (buffered here: any writer will do).
    pub fn write(&self, out: impl Write) -> io::Result<Written> {
        self.emit(None, out).map(|e| e.written)
    }

    /// Writes the export after `edits` to `out`: a full export again, as the directory would
    /// be exported after the changes. The counts say what changed against [`write`](Self::write).
    pub fn write_edited(&self, edits: &Edits, out: impl Write) -> io::Result<Edited> {
        self.emit(Some(&Selection::new(self.users, edits)), out)
    }

    /// The `objectGUID` of user `i` (as the export writes it).
    pub fn user_guid(&self, i: usize) -> uuid::Uuid {
        self.guid(TAG_USER | i as u64)
    }

    fn guid(&self, tagged: u64) -> uuid::Uuid {
        // `mix` is a bijection: distinct numbers get distinct low halves.
        let lo = mix(tagged ^ self.seed.rotate_left(17));
        uuid::Uuid::from_u64_pair(mix(lo ^ self.seed), lo)
    }

    fn user(&self, i: usize) -> User {
        let h = mix(self.seed ^ i as u64);
        let h2 = mix(h);
        let department = (h >> 40) as usize % DEPARTMENTS.len();
        let title = TITLES[(h >> 48) as usize % TITLES.len()];
        User {
            i,
            given: GIVEN[h as usize % GIVEN.len()],
            sn: SURNAMES[(h >> 8) as usize % SURNAMES.len()],
            department,
            region: (h >> 44) as usize % REGIONS.len(),
            title: format!("{} {title}", DEPARTMENTS[department].0),
            company: match (h >> 52) % 20 {
                0 => "Fabrikam",
                1 => "Northwind",
                _ => "Contoso",
            },
            phone: (h >> 16) % 10_000,
            // Fifteen years from 2010-01-01.
            created: 1_262_304_000 + h2 % (15 * 365 * 86_400),
            account_control: match (h2 >> 40) % 50 {
                0 => 514,
                1 | 2 => 66048,
                _ => 512,
            },
            manager: (i > 0).then(|| (i - 1) / 10),
        }
    }

    /// The DN of user `i` (its department and region OUs as first generated).
    pub fn user_dn(&self, i: usize) -> String {
        let u = self.user(i);
        format!(
            "CN={} {} {},OU={},OU={},OU=Staff,{BASE}",
            u.given, u.sn, u.i, REGIONS[u.region], DEPARTMENTS[u.department].0
        )
    }

    fn team_dn(g: usize) -> String {
        format!("CN=Team {g:05},OU=Groups,{BASE}")
    }

    fn big_dn() -> String {
        format!("CN=All Staff,OU=Groups,{BASE}")
    }

    /// Members of `All Staff` among the first `users` users (every second user).
    fn big_members(&self) -> usize {
        self.users.div_ceil(2).min(self.big_group)
    }

    fn emit(&self, edits: Option<&Selection>, out: impl Write) -> io::Result<Edited> {
        let mut w = Counting {
            inner: BufWriter::with_capacity(1 << 18, out),
            bytes: 0,
        };
        let mut ed = Edited::default();
        writeln!(
            w,
            "# corp.contoso.com: a generated Active Directory export of {} users (dirsync \
             testkit::scale, seed {}{}).\n# objectGUID is written as GUID text.\nversion: 1\n",
            self.users,
            self.seed,
            match edits {
                Some(s) => format!(", edits seed {} one in {}", s.seed, s.one_in),
                None => String::new(),
            }
        )?;
        ed.written.ous = self.write_ous(&mut w)?;
        let added = edits.map_or(0, Selection::added);
        let mut j = 0;
        for i in 0..self.users {
            let mut u = self.user(i);
            match edits.map_or(Fate::Kept, |s| s.fate(i)) {
                Fate::Kept => {}
                Fate::Deleted => {
                    ed.deleted += 1;
                    continue;
                }
                Fate::Spawns => {
                    self.write_user(&mut w, &u, &mut ed.written)?;
                    // The new user: the next number after the export's, reporting to `i`.
                    let mut new = self.user(self.users + j);
                    new.manager = Some(i);
                    self.write_user(&mut w, &new, &mut ed.written)?;
                    ed.added += 1;
                    j += 1;
                    continue;
                }
                Fate::Changed => {
                    if let Some(s) = edits {
                        self.change(&mut u, s);
                    }
                    ed.changed += 1;
                }
            }
            self.write_user(&mut w, &u, &mut ed.written)?;
        }
        debug_assert_eq!(j, added);
        for g in 0..self.team_groups() {
            let first = g * self.group_size;
            let last = (first + self.group_size).min(self.users);
            let members = (first..last).filter(|&i| !edits.is_some_and(|s| s.deleted(i)));
            // New user `n + j` joins team group `j mod groups`.
            let teams = self.team_groups();
            let new = (g..added).step_by(teams.max(1)).map(|j| self.users + j);
            let (changed, n) = self.write_group(
                &mut w,
                &Self::team_dn(g),
                TAG_GROUP | g as u64,
                &format!("Team {g:05}"),
                &format!("Everyone in team {g}"),
                members.chain(new),
                last - first,
            )?;
            ed.written.members += n;
            ed.groups_changed += usize::from(changed);
        }
        let members = (0..self.big_members())
            .map(|m| 2 * m)
            .filter(|&i| !edits.is_some_and(|s| s.deleted(i)))
            .chain((0..added).map(|j| self.users + j));
        let (changed, n) = self.write_group(
            &mut w,
            &Self::big_dn(),
            TAG_GROUP | (1 << 40),
            "All Staff",
            "Every second member of staff, the large group of the benchmark",
            members,
            self.big_members(),
        )?;
        ed.written.members += n;
        ed.groups_changed += usize::from(changed);
        ed.written.groups = self.groups();
        w.flush()?;
        ed.written.bytes = w.bytes;
        Ok(ed)
    }

    /// Changes user `u` as `s` says (it is touched, neither deleted nor spawning).
    fn change(&self, u: &mut User, s: &Selection) {
        let other = mix(s.seed ^ u.i as u64);
        match s.variant(u.i) {
            1 => u.phone = (u.phone + 1 + other % 9_999) % 10_000,
            2 => {
                u.department = (u.department + 1 + other as usize % 7) % DEPARTMENTS.len();
                u.title = format!(
                    "{} {}",
                    DEPARTMENTS[u.department].0,
                    TITLES[other as usize % TITLES.len()]
                );
            }
            3 => u.account_control ^= 2,
            4 if self.new_manager(u, s, other) => {}
            _ => u.title = format!("Principal {}", u.title),
        }
    }

    /// Gives `u` another manager, one with a lower number (no cycle) that stays; false when
    /// there is none.
    fn new_manager(&self, u: &mut User, s: &Selection, other: u64) -> bool {
        let Some(current) = u.manager else {
            return false;
        };
        let mut c = (other % u.i as u64) as usize;
        loop {
            if c != current && !s.deleted(c) {
                u.manager = Some(c);
                return true;
            }
            if c == 0 {
                return false;
            }
            c -= 1;
        }
    }

    fn write_ous(&self, w: &mut impl Write) -> io::Result<usize> {
        let ou = |w: &mut dyn Write, dn: &str, name: &str| -> io::Result<()> {
            writeln!(
                w,
                "dn: {dn}\nobjectClass: top\nobjectClass: organizationalUnit\nou: {name}\n"
            )
        };
        let mut n = 0;
        ou(w, &format!("OU=Staff,{BASE}"), "Staff")?;
        n += 1;
        for (d, _) in DEPARTMENTS {
            ou(w, &format!("OU={d},OU=Staff,{BASE}"), d)?;
            n += 1;
            for r in REGIONS {
                ou(w, &format!("OU={r},OU={d},OU=Staff,{BASE}"), r)?;
                n += 1;
            }
        }
        ou(w, &format!("OU=Groups,{BASE}"), "Groups")?;
        Ok(n + 1)
    }

    fn write_user(&self, w: &mut impl Write, u: &User, count: &mut Written) -> io::Result<()> {
        let dn = self.user_dn(u.i);
        let (given, sn, i) = (u.given, u.sn, u.i);
        let cn = format!("{given} {sn} {i}");
        let sam = format!(
            "{}{}{i}",
            given[..1].to_ascii_lowercase(),
            sn.to_ascii_lowercase()
        );
        let (department, code) = DEPARTMENTS[u.department];
        let created = chrono::DateTime::from_timestamp(u.created as i64, 0)
            .unwrap_or_default()
            .format("%Y%m%d%H%M%S");
        write!(
            w,
            "dn: {dn}\n\
             objectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n\
             objectClass: user\n\
             cn: {cn}\n\
             objectGUID: {guid}\n\
             sAMAccountName: {sam}\n\
             userPrincipalName: {sam}@contoso.com\n\
             givenName: {given}\n\
             sn: {sn}\n\
             displayName: {given} {sn}\n\
             mail: {mail}.{i}@contoso.com\n\
             department: {department}\n\
             title: {title}\n\
             company: {company}\n\
             telephoneNumber: +1 425 555 {phone:04}\n\
             employeeID: E{i:07}\n\
             extensionAttribute1: CC{code}-{department}\n\
             whenCreated: {created}.0Z\n\
             userAccountControl: {uac}\n",
            guid = self.user_guid(i).hyphenated(),
            mail = format!("{given}.{sn}").to_ascii_lowercase(),
            title = u.title,
            company = u.company,
            phone = u.phone,
            uac = u.account_control,
        )?;
        if let Some(m) = u.manager {
            writeln!(w, "manager: {}", self.user_dn(m))?;
            count.managed += 1;
        }
        writeln!(w)?;
        count.users += 1;
        Ok(())
    }

    /// Writes a group; returns whether its members differ from the `unedited` ones it had
    /// (edits only remove members and add new users, so a new user or a lower count tells) and
    /// how many it has.
    #[allow(clippy::too_many_arguments)]
    fn write_group(
        &self,
        w: &mut impl Write,
        dn: &str,
        tag: u64,
        name: &str,
        description: &str,
        members: impl Iterator<Item = usize>,
        unedited: usize,
    ) -> io::Result<(bool, usize)> {
        writeln!(
            w,
            "dn: {dn}\nobjectClass: top\nobjectClass: group\ncn: {name}\nobjectGUID: {}\n\
             sAMAccountName: {name}\ndescription: {description}\ngroupType: -2147483646",
            self.guid(tag).hyphenated()
        )?;
        let (mut n, mut changed) = (0, false);
        for i in members {
            writeln!(w, "member: {}", self.user_dn(i))?;
            n += 1;
            changed |= i >= self.users;
        }
        writeln!(w)?;
        Ok((changed || n != unedited, n))
    }
}

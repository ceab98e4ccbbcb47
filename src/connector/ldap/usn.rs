//! Active Directory delta import by uSNChanged polling: the fallback for accounts without the
//! "Replicating Directory Changes" right that DirSync needs.
//!
//! The watermark (kind `"usn"`, text `<invocationId>:<usn>`) names the domain controller's
//! database (the `invocationId` of its NTDS Settings object, found through the root DSE's
//! `dsServiceName`) and its `highestCommittedUSN` read *before* the import's searches began, so
//! a change made while an import runs is seen again next time rather than lost. USNs are local
//! to one DC's database: a watermark of another `invocationId` (another DC, or this one restored
//! from backup) is [`ErrorKind::InvalidWatermark`] and the engine runs a full import.
//!
//! A delta import is a paged search of `(&<filter>(uSNChanged>=N+1))` under the base DN, each
//! object emitted whole as [`Change::Replace`], then a paged search with the Show Deleted control
//! of `(&(isDeleted=TRUE)(uSNChanged>=N+1))` under the naming context's `CN=Deleted Objects`,
//! each tombstone emitted as [`Change::Delete`] by objectGUID. Not seen by this mode (DirSync
//! sees them): an object that moved out of the base DN, or stopped matching the filter, stays in
//! the mirror until the next full import. It only reads.

use std::sync::Arc;

use ldap3::Scope;

use super::config::LdapSourceConfig;
use super::conn::LdapHandle;
use super::control::show_deleted_control;
use super::dirsync::{require_guid_anchor, root_dse};
use super::entry::{guid_anchor, EntryMapper, RawEntry};
use super::search::{complete_ranges, PagedSearch, SearchSpec};
use crate::connector::{ConnectorError, ErrorKind, ImportItem, Watermark};
use crate::model::Change;

/// The watermark kind of a uSNChanged position.
pub const USN_WATERMARK: &str = "usn";

/// A position in one DC's change history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsnWatermark {
    /// The invocationId of the DC's database, as GUID text.
    pub invocation_id: String,
    /// The highest USN committed when the import began.
    pub usn: u64,
}

impl UsnWatermark {
    /// The watermark.
    pub fn to_watermark(&self) -> Watermark {
        Watermark::new(
            USN_WATERMARK,
            format!("{}:{}", self.invocation_id, self.usn),
        )
    }

    /// Reads a watermark; anything else than a `usn` watermark of the form
    /// `<invocationId>:<usn>` is [`ErrorKind::InvalidWatermark`].
    pub fn parse(w: &Watermark) -> Result<UsnWatermark, ConnectorError> {
        let invalid = |why: &str| {
            ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!("{w:?} is not a uSNChanged watermark: {why}"),
            )
        };
        if w.kind != USN_WATERMARK {
            return Err(invalid("its kind is not \"usn\""));
        }
        let text = w.as_text().ok_or_else(|| invalid("it is not text"))?;
        let (id, usn) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected <invocationId>:<usn>"))?;
        let invocation_id = uuid::Uuid::parse_str(id)
            .map_err(|_| invalid("the invocationId is not a GUID"))?
            .to_string();
        let usn = usn
            .parse()
            .map_err(|_| invalid("the USN is not a number"))?;
        Ok(UsnWatermark { invocation_id, usn })
    }
}

/// The DC's current position: its invocationId and highestCommittedUSN.
pub(crate) async fn current(handle: &mut LdapHandle) -> Result<UsnWatermark, ConnectorError> {
    let dse = root_dse(handle).await?;
    let protocol = |m: String| ConnectorError::new(ErrorKind::Protocol, m);
    let usn = dse.highest_committed_usn.ok_or_else(|| {
        protocol("the root DSE has no highestCommittedUSN: is this Active Directory?".into())
    })?;
    let service = dse.ds_service_name.ok_or_else(|| {
        protocol("the root DSE has no dsServiceName: is this Active Directory?".into())
    })?;
    let spec = SearchSpec {
        base: service.clone(),
        scope: Scope::Base,
        filter: "(objectClass=*)".to_owned(),
        attrs: vec!["invocationId".to_owned()],
        controls: Vec::new(),
    };
    let (items, res) = super::search::search_raw(handle, &spec).await?;
    if res.rc != 0 {
        return Err(super::conn::result_error(&res).with_object(&service));
    }
    let raw = items
        .into_iter()
        .find(|i| i.0.id == 4)
        .map(|i| RawEntry::parse(i.0))
        .transpose()?
        .ok_or_else(|| {
            protocol(format!(
                "the DC's settings object {service} did not come back"
            ))
        })?;
    let id = raw
        .attrs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("invocationId"))
        .and_then(|(_, v)| v.first())
        .ok_or_else(|| protocol(format!("{service} has no readable invocationId")))?;
    let invocation_id = guid_anchor(id)
        .map_err(|m| protocol(format!("invocationId of {service}: {m}")))?
        .as_str()
        .to_owned();
    Ok(UsnWatermark { invocation_id, usn })
}

/// The watermark a full import ends with: taken before its search starts.
pub(crate) async fn initial_watermark(
    handle: &mut LdapHandle,
    config: &LdapSourceConfig,
) -> Result<Watermark, ConnectorError> {
    require_guid_anchor(config, "usn_changed")?;
    Ok(current(handle).await?.to_watermark())
}

enum Phase {
    Changed(PagedSearch),
    Deleted(PagedSearch),
    Done,
}

/// A delta import in progress.
pub(crate) struct UsnDelta {
    mapper: Arc<EntryMapper>,
    deleted_objects: String,
    from: u64,
    page_size: u32,
    next: UsnWatermark,
    phase: Phase,
    checkpoint_sent: bool,
}

impl UsnDelta {
    /// Checks `since` against the DC and prepares the searches.
    pub async fn start(
        mut handle: LdapHandle,
        config: Arc<LdapSourceConfig>,
        mapper: Arc<EntryMapper>,
        since: &Watermark,
    ) -> Result<UsnDelta, ConnectorError> {
        require_guid_anchor(&config, "usn_changed")?;
        let since = UsnWatermark::parse(since)?;
        let now = current(&mut handle).await?;
        if now.invocation_id != since.invocation_id {
            return Err(ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!(
                    "source {}: the watermark's USN belongs to database {} but the DC's \
                     invocationId is now {} (another DC, or this one restored): USNs cannot be \
                     compared, a full import is needed",
                    config.name, since.invocation_id, now.invocation_id
                ),
            ));
        }
        let nc = root_dse(&mut handle)
            .await?
            .naming_context_of(&config.base_dn)?;
        let from = since.usn.saturating_add(1);
        let changed = SearchSpec {
            base: config.base_dn.clone(),
            scope: config.scope.to_ldap3(),
            filter: format!("(&{}(uSNChanged>={from}))", config.filter),
            attrs: config.requested_attributes(),
            controls: Vec::new(),
        };
        Ok(UsnDelta {
            mapper,
            deleted_objects: format!("CN=Deleted Objects,{nc}"),
            from,
            page_size: config.connection.page_size,
            next: UsnWatermark {
                usn: now.usn,
                ..since
            },
            phase: Phase::Changed(PagedSearch::new(
                handle,
                changed,
                config.connection.page_size,
            )),
            checkpoint_sent: false,
        })
    }

    /// The next item, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<ImportItem<Change>>, ConnectorError> {
        loop {
            match &mut self.phase {
                Phase::Changed(search) => {
                    let Some(tag) = search.next().await? else {
                        let handle = search.handle().clone();
                        let spec = deleted_spec(&self.deleted_objects, self.from);
                        self.phase = Phase::Deleted(PagedSearch::new(handle, spec, self.page_size));
                        continue;
                    };
                    let mut raw = RawEntry::parse(tag)?;
                    if raw.attrs.iter().any(|(n, _)| n.contains(';')) {
                        let mut handle = search.handle().clone();
                        complete_ranges(&mut handle, &mut raw).await?;
                    }
                    if let Some(entry) = self.mapper.to_entry(raw)? {
                        return Ok(Some(ImportItem::Item(Change::Replace(entry))));
                    }
                }
                Phase::Deleted(search) => {
                    let Some(tag) = search.next().await? else {
                        self.phase = Phase::Done;
                        continue;
                    };
                    let raw = RawEntry::parse(tag)?;
                    if raw.dn.eq_ignore_ascii_case(&self.deleted_objects) {
                        continue;
                    }
                    let classes = raw
                        .attrs
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("objectClass"))
                        .map(|(_, v)| v.as_slice())
                        .unwrap_or_default();
                    let Some(object_type) = self.mapper.object_type(classes) else {
                        continue;
                    };
                    let guid = raw
                        .attrs
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("objectGUID"))
                        .and_then(|(_, v)| v.first())
                        .ok_or_else(|| {
                            ConnectorError::new(
                                ErrorKind::Protocol,
                                "a tombstone carries no objectGUID",
                            )
                            .with_object(&raw.dn)
                        })?;
                    let anchor = guid_anchor(guid).map_err(|m| {
                        ConnectorError::new(ErrorKind::Protocol, format!("objectGUID: {m}"))
                            .with_object(&raw.dn)
                    })?;
                    return Ok(Some(ImportItem::Item(Change::Delete {
                        anchor,
                        object_type,
                    })));
                }
                Phase::Done => {
                    if self.checkpoint_sent {
                        return Ok(None);
                    }
                    self.checkpoint_sent = true;
                    return Ok(Some(ImportItem::Checkpoint(self.next.to_watermark())));
                }
            }
        }
    }
}

/// The tombstone search from USN `from`.
fn deleted_spec(deleted_objects: &str, from: u64) -> SearchSpec {
    SearchSpec {
        base: deleted_objects.to_owned(),
        scope: Scope::OneLevel,
        filter: format!("(&(isDeleted=TRUE)(uSNChanged>={from}))"),
        attrs: ["objectGUID", "objectClass", "isDeleted", "lastKnownParent"]
            .map(String::from)
            .to_vec(),
        controls: vec![show_deleted_control()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_round_trip_and_others_are_invalid() {
        let w = UsnWatermark {
            invocation_id: "6f1e2d3c-0000-1000-8000-00aa00bb00cc".into(),
            usn: 4711,
        };
        let m = w.to_watermark();
        assert_eq!(m.kind, "usn");
        assert_eq!(
            m.as_text(),
            Some("6f1e2d3c-0000-1000-8000-00aa00bb00cc:4711")
        );
        assert_eq!(UsnWatermark::parse(&m).unwrap(), w);
        for bad in [
            Watermark::new("dirsync", m.data.clone()),
            Watermark::new("usn", b"4711".to_vec()),
            Watermark::new("usn", b"not-a-guid:4711".to_vec()),
            Watermark::new("usn", b"6f1e2d3c-0000-1000-8000-00aa00bb00cc:x".to_vec()),
            Watermark::new("usn", vec![0xff, 0xfe]),
        ] {
            let e = UsnWatermark::parse(&bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{bad:?}");
        }
    }

    #[test]
    fn the_tombstone_search_asks_for_deleted_objects_since_the_usn() {
        let s = deleted_spec("CN=Deleted Objects,DC=x", 12);
        assert_eq!(s.filter, "(&(isDeleted=TRUE)(uSNChanged>=12))");
        assert_eq!(s.controls.len(), 1);
        assert_eq!(s.base, "CN=Deleted Objects,DC=x");
    }
}

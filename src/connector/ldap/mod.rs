//! The LDAP connector (feature `ldap`): Active Directory and OpenLDAP as sources, LDAP
//! directories as targets, over `ldap3` with rustls.

pub mod control;

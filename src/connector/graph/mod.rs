//! Microsoft Entra ID through Microsoft Graph v1.0.
pub mod auth;
pub(crate) mod client;
pub mod csdl;
pub mod filter;

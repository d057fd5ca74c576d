//! The IMDS protocol as the agent speaks it: which paths exist, what a valid request looks
//! like, and IMDS's own error shapes. Pure: the HTTP server feeds it parsed requests.
pub mod path;
pub mod request;

pub use self::{
    path::{PathRules, TOKEN_PATH},
    request::{route, token_query, ImdsError, Route, TokenRequest, JSON_CONTENT_TYPE},
};

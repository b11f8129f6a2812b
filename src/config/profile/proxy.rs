//! `[k3s.proxy]` as written: the HTTP(S) proxy k3s and containerd use,
//! and extra `NO_PROXY` entries. The URLs and entries are typed here;
//! what `NO_PROXY` is derived from is the plan's (`plan/proxy.rs`).

use std::ops::Range;

use super::{At, Tab};
use crate::config::diag::Diagnostics;
use crate::config::types::{self, ProxyUrl};

#[derive(Debug, Clone)]
pub struct Proxy {
    pub span: Range<usize>,
    pub key: String,
    pub http: Option<At<ProxyUrl>>,
    pub https: Option<At<ProxyUrl>>,
    pub no_proxy: Vec<At<String>>,
}

pub(super) fn read(k: &mut Tab, d: &mut Diagnostics) -> Option<Proxy> {
    let (mut p, span) = k.table_with_span(d, "proxy")?;
    let out = Proxy {
        span,
        key: p.path.clone(),
        http: p.parse(d, "http", ProxyUrl::parse),
        https: p.parse(d, "https", ProxyUrl::parse),
        no_proxy: p.parse_list(d, "no-proxy", types::parse_no_proxy),
    };
    p.finish(d);
    Some(out)
}

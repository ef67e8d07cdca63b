//! Pagination.
//!
//! - Offset, exactly as the catalog: `?page=&limit=` in, and
//!   `{"data": [...], "pagination": {"page", "limit", "total", "totalPages"}}` out, plus an RFC 8288
//!   `Link` header with `first`, `prev`, `next` and `last`.
//! - Cursor (keyset) for large collections: `?cursor=&limit=` in (an empty cursor is the first
//!   page), `{"data": [...], "next_cursor": "..." | null}` out. The cursor is opaque and signed
//!   ([`super::cursor`]); a page costs the same however deep it is, and rows inserted meanwhile
//!   never shift it.

use serde::Serialize;

use super::problem::Problem;

pub const DEFAULT_LIMIT: u64 = 20;
pub const MAX_LIMIT: u64 = 100;
/// Pages beyond this are refused so that `offset` can never overflow.
pub const MAX_PAGE: u64 = 1_000_000_000;

/// A validated page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub page: u64,
    pub limit: u64,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest {
            page: 1,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl PageRequest {
    /// Read `page` (>= 1, default 1) and `limit` (1..=100, default 20) from a raw query string.
    /// Every wrong parameter is listed in the problem's `invalid-params`.
    pub fn from_query(query: Option<&str>) -> Result<Self, Problem> {
        let mut req = PageRequest::default();
        let mut invalid: Vec<(&str, String)> = Vec::new();
        let mut seen = (false, false);
        for (name, value) in form_pairs(query.unwrap_or("")) {
            let (slot, min, max, flag) = match name.as_str() {
                "page" => (&mut req.page, 1, MAX_PAGE, &mut seen.0),
                "limit" => (&mut req.limit, 1, MAX_LIMIT, &mut seen.1),
                _ => continue,
            };
            let pname = if name == "page" { "page" } else { "limit" };
            if *flag {
                invalid.push((pname, "given more than once".into()));
                continue;
            }
            *flag = true;
            match value.trim().parse::<i128>() {
                Ok(n) if n >= min as i128 && n <= max as i128 => *slot = n as u64,
                Ok(_) => invalid.push((pname, format!("must be an integer from {min} to {max}"))),
                Err(_) => invalid.push((pname, format!("must be an integer from {min} to {max}, got {value:?}"))),
            }
        }
        if invalid.is_empty() {
            Ok(req)
        } else {
            Err(Problem::invalid(http::StatusCode::BAD_REQUEST, &invalid))
        }
    }

    pub fn offset(&self) -> u64 {
        (self.page - 1) * self.limit
    }
}

/// A list request in either mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListRequest {
    Offset(PageRequest),
    /// `cursor` is `None` for the first page.
    Cursor {
        cursor: Option<String>,
        limit: u64,
    },
}

impl ListRequest {
    /// `cursor` present (even empty) selects cursor mode; combining it with `page` is a 400.
    pub fn from_query(query: Option<&str>) -> Result<Self, Problem> {
        let pairs = form_pairs(query.unwrap_or(""));
        let cursors: Vec<&String> = pairs.iter().filter(|(k, _)| k == "cursor").map(|(_, v)| v).collect();
        if cursors.is_empty() {
            return PageRequest::from_query(query).map(ListRequest::Offset);
        }
        let mut invalid: Vec<(&str, String)> = Vec::new();
        if cursors.len() > 1 {
            invalid.push(("cursor", "given more than once".into()));
        }
        if pairs.iter().any(|(k, _)| k == "page") {
            invalid.push(("page", "cannot be combined with cursor".into()));
        }
        // Reuse the limit rules of offset paging.
        let limit_only: String = pairs
            .iter()
            .filter(|(k, _)| k == "limit")
            .map(|(_, v)| format!("limit={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let limit = match PageRequest::from_query(Some(&limit_only)) {
            Ok(r) => r.limit,
            Err(_) => {
                invalid.push(("limit", format!("must be an integer from 1 to {MAX_LIMIT}")));
                DEFAULT_LIMIT
            }
        };
        if !invalid.is_empty() {
            return Err(Problem::invalid(http::StatusCode::BAD_REQUEST, &invalid));
        }
        let cursor = cursors[0].clone();
        Ok(ListRequest::Cursor {
            cursor: (!cursor.is_empty()).then_some(cursor),
            limit,
        })
    }
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Decode `a=1&b=2` (with `+` and percent escapes) into pairs; undecodable bytes become U+FFFD.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The catalog's pagination block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PageInfo {
    pub page: u64,
    pub limit: u64,
    pub total: u64,
    #[serde(rename = "totalPages")]
    pub total_pages: u64,
}

/// One page of a collection.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub pagination: PageInfo,
}

impl<T> Page<T> {
    pub fn new(data: Vec<T>, req: PageRequest, total: u64) -> Self {
        Page {
            data,
            pagination: PageInfo {
                page: req.page,
                limit: req.limit,
                total,
                total_pages: total.div_ceil(req.limit),
            },
        }
    }
}

impl<T> Page<T> {
    /// RFC 8288 `Link` header value for this page of the collection at `path` (e.g. `/cases`):
    /// `first` and `last` always (`last` is page 1 of an empty collection), `prev` and `next` when
    /// they exist. Targets are relative references, resolved against the request URI.
    pub fn link_header(&self, path: &str) -> String {
        let PageInfo {
            page,
            limit,
            total_pages,
            ..
        } = self.pagination;
        let last = total_pages.max(1);
        let link = |p: u64, rel: &str| format!("<{path}?page={p}&limit={limit}>; rel=\"{rel}\"");
        let mut links = vec![link(1, "first")];
        if page > 1 {
            links.push(link((page - 1).min(last), "prev"));
        }
        if page < total_pages {
            links.push(link(page + 1, "next"));
        }
        links.push(link(last, "last"));
        links.join(", ")
    }
}

/// One page of a collection in cursor mode.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CursorPage<T> {
    pub data: Vec<T>,
    /// Pass as `?cursor=` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        assert_eq!(
            PageRequest::from_query(None).unwrap(),
            PageRequest { page: 1, limit: 20 }
        );
        assert_eq!(
            PageRequest::from_query(Some("page=3&limit=100&x=1")).unwrap(),
            PageRequest { page: 3, limit: 100 }
        );
        assert_eq!(PageRequest::from_query(Some("limit=1")).unwrap().limit, 1);
        for bad in [
            "page=0",
            "page=-1",
            "limit=0",
            "limit=101",
            "page=abc",
            "limit=",
            "page=1&page=2",
            "page=99999999999999999999999999999999999999999",
            "page=1.5",
            "page=%ZZ",
            "page=1e3",
        ] {
            let p = PageRequest::from_query(Some(bad)).unwrap_err();
            assert_eq!(p.status, 400, "{bad}");
            assert!(p.extensions.contains_key("invalid-params"));
        }
        assert_eq!(PageRequest::from_query(Some("page=%32")).unwrap().page, 2);
    }

    #[test]
    fn list_request_modes() {
        assert_eq!(
            ListRequest::from_query(None).unwrap(),
            ListRequest::Offset(PageRequest::default())
        );
        assert_eq!(
            ListRequest::from_query(Some("cursor=&limit=5")).unwrap(),
            ListRequest::Cursor { cursor: None, limit: 5 }
        );
        assert_eq!(
            ListRequest::from_query(Some("cursor=abc")).unwrap(),
            ListRequest::Cursor {
                cursor: Some("abc".into()),
                limit: 20
            }
        );
        for bad in [
            "cursor=a&page=2",
            "cursor=a&cursor=b",
            "cursor=a&limit=0",
            "cursor=a&limit=x",
        ] {
            assert_eq!(ListRequest::from_query(Some(bad)).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn link_headers() {
        let page = |p: u64, total: u64| Page::<u8>::new(vec![], PageRequest { page: p, limit: 20 }, total);
        assert_eq!(
            page(2, 45).link_header("/cases"),
            "</cases?page=1&limit=20>; rel=\"first\", </cases?page=1&limit=20>; rel=\"prev\", </cases?page=3&limit=20>; rel=\"next\", </cases?page=3&limit=20>; rel=\"last\""
        );
        assert_eq!(
            page(1, 45).link_header("/c"),
            "</c?page=1&limit=20>; rel=\"first\", </c?page=2&limit=20>; rel=\"next\", </c?page=3&limit=20>; rel=\"last\""
        );
        assert_eq!(
            page(3, 45).link_header("/c"),
            "</c?page=1&limit=20>; rel=\"first\", </c?page=2&limit=20>; rel=\"prev\", </c?page=3&limit=20>; rel=\"last\""
        );
        assert_eq!(
            page(1, 0).link_header("/c"),
            "</c?page=1&limit=20>; rel=\"first\", </c?page=1&limit=20>; rel=\"last\""
        );
        // Beyond the end: prev points at the last page.
        assert!(
            page(9, 45)
                .link_header("/c")
                .contains("</c?page=3&limit=20>; rel=\"prev\"")
        );
    }

    #[test]
    fn total_pages() {
        let r = PageRequest { page: 1, limit: 20 };
        assert_eq!(Page::<u8>::new(vec![], r, 0).pagination.total_pages, 0);
        assert_eq!(Page::<u8>::new(vec![], r, 20).pagination.total_pages, 1);
        assert_eq!(Page::<u8>::new(vec![], r, 21).pagination.total_pages, 2);
        assert_eq!(PageRequest { page: 3, limit: 20 }.offset(), 40);
    }
}

//! Pagination, offset style exactly as the catalog: `?page=&limit=` in, and
//! `{"data": [...], "pagination": {"page", "limit", "total", "totalPages"}}` out.

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
            let detail = invalid
                .iter()
                .map(|(n, r)| format!("{n} {r}"))
                .collect::<Vec<_>>()
                .join("; ");
            Err(Problem::bad_request(detail).with_invalid_params(&invalid))
        }
    }

    pub fn offset(&self) -> u64 {
        (self.page - 1) * self.limit
    }
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
    fn total_pages() {
        let r = PageRequest { page: 1, limit: 20 };
        assert_eq!(Page::<u8>::new(vec![], r, 0).pagination.total_pages, 0);
        assert_eq!(Page::<u8>::new(vec![], r, 20).pagination.total_pages, 1);
        assert_eq!(Page::<u8>::new(vec![], r, 21).pagination.total_pages, 2);
        assert_eq!(PageRequest { page: 3, limit: 20 }.offset(), 40);
    }
}

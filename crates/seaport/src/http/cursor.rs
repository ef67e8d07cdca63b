//! Opaque, tamper-evident keyset cursors: a position (e.g. the last row's sequence number)
//! signed with HMAC-SHA256 and encoded base64url. A forged, truncated or garbled cursor is a 400.
//!
//! The signing key is shared by every instance through the database (`seaport_settings`), so a
//! cursor from one instance works on another.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::problem::Problem;
use crate::store::Db;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the HMAC tag kept in a cursor (128 bits).
const TAG_LEN: usize = 16;
/// Cursor format version, part of the signed payload.
const VERSION: u8 = 1;

#[derive(Clone)]
pub struct CursorCodec {
    key: Vec<u8>,
}

impl std::fmt::Debug for CursorCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorCodec(<key>)")
    }
}

impl CursorCodec {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        CursorCodec { key: key.into() }
    }

    /// The codec with the database's shared key (made on first use).
    pub async fn from_db(db: &Db) -> Result<Self, sqlx::Error> {
        let mut fresh = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut fresh);
        let mut tx = db.begin_write().await?;
        let key: Vec<u8> = crate::on_conn!(&mut tx, c => {
            sqlx::query("INSERT INTO seaport_settings (name, value) VALUES ('cursor_key', $1) ON CONFLICT (name) DO NOTHING")
                .bind(&fresh)
                .execute(&mut *c)
                .await?;
            sqlx::query_scalar("SELECT value FROM seaport_settings WHERE name = 'cursor_key'").fetch_one(&mut *c).await?
        });
        tx.commit().await?;
        Ok(CursorCodec::new(key))
    }

    fn tag(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// Encode a position.
    pub fn encode(&self, position: i64) -> String {
        let mut bytes = Vec::with_capacity(9 + TAG_LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&position.to_be_bytes());
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decode and verify (constant time) a cursor.
    pub fn decode(&self, cursor: &str) -> Result<i64, Problem> {
        let invalid = || {
            Problem::bad_request("invalid cursor: use the next_cursor value of a previous page unchanged")
                .with_type("/problems/invalid-cursor", "Invalid cursor")
        };
        if cursor.len() > 64 {
            return Err(invalid());
        }
        let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
        if bytes.len() != 9 + TAG_LEN || bytes[0] != VERSION {
            return Err(invalid());
        }
        let (payload, tag) = bytes.split_at(9);
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload);
        mac.verify_truncated_left(tag).map_err(|_| invalid())?;
        Ok(i64::from_be_bytes(payload[1..9].try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_forgeries() {
        let codec = CursorCodec::new(b"k".to_vec());
        for p in [0, 1, 42, i64::MAX, -5] {
            assert_eq!(codec.decode(&codec.encode(p)).unwrap(), p);
        }
        let good = codec.encode(42);
        // Another key, a flipped character, truncation, junk: all refused with 400.
        let other = CursorCodec::new(b"other".to_vec()).encode(42);
        let mut flipped = good.clone().into_bytes();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        for bad in [
            other,
            String::from_utf8(flipped).unwrap(),
            good[..good.len() - 2].to_owned(),
            "%%%".into(),
            "".into(),
            "x".repeat(500),
        ] {
            assert_eq!(codec.decode(&bad).unwrap_err().status, 400, "{bad}");
        }
    }
}

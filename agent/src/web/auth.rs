//! Basic authentication against bcrypt hashes, with verified results cached so that a scrape
//! costs one bcrypt only the first time a user and password are seen.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use base64::Engine as _;

/// Entries kept before the cache is emptied (it holds outcomes, not passwords, but random
/// passwords must not grow it without bound).
const CACHE_LIMIT: usize = 1024;

/// A valid hash that nothing matches in practice: an unknown user still costs one bcrypt, so
/// that the answer's timing does not tell which users exist.
const UNKNOWN_USER_HASH: &str = "$2b$10$JYpB1f0S8uHUkxuaLvwgReBkrsMH8TgSm/6RC5ypRPA5Y.NcsM1ZG";

/// The users of `basic_auth_users` and the outcomes verified so far.
#[derive(Debug)]
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    cache: Mutex<HashMap<[u8; 32], bool>>,
}

/// What an `Authorization` header holds, before the (slow) bcrypt.
#[derive(Debug)]
pub struct Credentials {
    user: String,
    password: Vec<u8>,
    key: [u8; 32],
}

impl BasicAuth {
    /// None when there are no users: no authentication.
    pub fn new(users: BTreeMap<String, String>) -> Option<Self> {
        (!users.is_empty()).then(|| Self {
            users,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Splits a `Basic` header into user and password; None when absent or malformed.
    pub fn credentials(&self, authorization: Option<&[u8]>) -> Option<Credentials> {
        let value = std::str::from_utf8(authorization?).ok()?.trim();
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
        let password = decoded[colon + 1..].to_vec();
        let hash = self
            .users
            .get(&user)
            .map_or(UNKNOWN_USER_HASH, String::as_str);
        // The key binds user, stored hash and password, so a changed hash is a new entry.
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [user.as_bytes(), hash.as_bytes(), &password] {
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.finish().as_ref());
        Some(Credentials {
            user,
            password,
            key,
        })
    }

    /// The outcome when it was verified before.
    pub fn cached(&self, credentials: &Credentials) -> Option<bool> {
        self.lock().get(&credentials.key).copied()
    }

    /// Runs bcrypt (tens of milliseconds at cost 10: call it off the async workers) and caches
    /// the outcome.
    pub fn verify(&self, credentials: &Credentials) -> bool {
        let known = self.users.get(&credentials.user);
        let hash = known.map_or(UNKNOWN_USER_HASH, String::as_str);
        let matches = bcrypt::verify(&credentials.password, hash).unwrap_or(false);
        let granted = known.is_some() && matches;
        let mut cache = self.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(credentials.key, granted);
        granted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], bool>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    #[test]
    fn verifies_and_caches() {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let auth = BasicAuth::new(BTreeMap::from([("prom".to_owned(), hash)])).expect("users");
        let good = auth
            .credentials(Some(&header("prom", "s3cret")))
            .expect("parses");
        assert_eq!(auth.cached(&good), None);
        assert!(auth.verify(&good));
        assert_eq!(auth.cached(&good), Some(true));
        let bad = auth
            .credentials(Some(&header("prom", "wrong")))
            .expect("parses");
        assert!(!auth.verify(&bad));
        assert_eq!(auth.cached(&bad), Some(false));
        let stranger = auth
            .credentials(Some(&header("nobody", "s3cret")))
            .expect("parses");
        assert!(!auth.verify(&stranger));
        for malformed in [
            &b"Bearer abc"[..],
            b"Basic !!!",
            b"Basic bm9jb2xvbg==",
            b"\xff\xfe",
        ] {
            assert!(auth.credentials(Some(malformed)).is_none());
        }
        assert!(auth.credentials(None).is_none());
        assert!(BasicAuth::new(BTreeMap::new()).is_none());
    }

    #[test]
    fn the_unknown_user_hash_is_valid() {
        assert!(UNKNOWN_USER_HASH.parse::<bcrypt::HashParts>().is_ok());
        assert_eq!(bcrypt::verify("x", UNKNOWN_USER_HASH).ok(), Some(false));
    }
}

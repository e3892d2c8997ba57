//! The one SHA-256 every push, dedup check and verification uses.
//!
//! One artifact's digest is inherently sequential, so the hash rate of one core bounds Push.
//! aws-lc-rs (already linked for TLS) picks its assembly at run time: SHA-NI where the CPU has
//! it, AVX2/AVX-512 or SSSE3 code otherwise. The `sha2` crate matches it only on SHA-NI
//! machines and falls back to portable Rust elsewhere (about half the rate).
//! `artifactd-bench hash` measures both on the machine at hand.

use aws_lc_rs::digest;

use super::Sha256;

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Hasher(digest::Context);

impl Hasher {
    pub fn new() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Sha256 {
        let digest = self.0.finish();
        let bytes: &[u8; 32] = digest
            .as_ref()
            .try_into()
            .expect("a SHA-256 digest is 32 bytes");
        Sha256::from_digest(bytes)
    }

    /// The digest of `data`, in one call.
    pub fn digest(data: &[u8]) -> Sha256 {
        let mut hasher = Self::new();
        hasher.update(data);
        hasher.finish()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(SHA-256)")
    }
}

/// So `std::io::copy` can hash a file.
impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // FIPS 180-2 examples and the empty message.
        assert_eq!(
            Hasher::digest(b"").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            Hasher::digest(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            Hasher::digest(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").as_str(),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn one_mebibyte_in_any_chunking_hashes_the_same() {
        // 1,000,000 × 'a' is FIPS 180-2's long example.
        let data = vec![b'a'; 1_000_000];
        let expected = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
        assert_eq!(Hasher::digest(&data).as_str(), expected);
        for chunk in [1, 63, 64, 65, 4096, 999_999] {
            let mut hasher = Hasher::new();
            for part in data.chunks(chunk) {
                hasher.update(part);
            }
            assert_eq!(hasher.finish().as_str(), expected, "chunks of {chunk}");
        }
        let mut hasher = Hasher::new();
        std::io::copy(&mut &data[..], &mut hasher).unwrap();
        assert_eq!(hasher.finish().as_str(), expected);
    }
}

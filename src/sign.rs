//! Detached patch signatures in minisign's format (Ed25519, prehashed): `PATCH.minisig` beside
//! the patch, over the patch's bytes, its trusted comment naming the patch id. `minisign -Vm
//! PATCH -p KEY.pub` verifies them as well as factpatch does. Signatures carry random nonces:
//! the one output of factpatch that is not the same bytes twice.

use crate::patch::Patch;
use crate::{io_err, IoError};
use minisign::{KeyPair, PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// Everything that can go wrong signing or verifying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    /// A key file is not a minisign key, or a secret key cannot be unlocked.
    #[error("{}: {problem}", path.display())]
    Key { path: PathBuf, problem: String },
    /// The patch has no signature beside it.
    #[error("{}: unsigned (no {}): sign it with `factpatch sign`", patch.display(), signature.display())]
    Unsigned { patch: PathBuf, signature: PathBuf },
    /// The signature file is not a minisign signature.
    #[error("{}: not a minisign signature: {problem}", signature.display())]
    Malformed { signature: PathBuf, problem: String },
    /// Signed by a key that is not trusted.
    #[error("{}: signed by key {key_id}, which is not among the trusted keys", patch.display())]
    Untrusted { patch: PathBuf, key_id: String },
    /// The signature does not match the patch's bytes.
    #[error("{}: the signature by key {key_id} does not verify: {problem}", patch.display())]
    Invalid { patch: PathBuf, key_id: String, problem: String },
    /// The output exists.
    #[error("{}: already exists", .0.display())]
    Exists(PathBuf),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Who signed a patch: the key id (16 hex digits, as minisign prints it) and the signed comment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Signer {
    pub key_id: String,
    pub trusted_comment: String,
}

/// Where a patch's signature lives: `PATCH.minisig`.
pub fn signature_path(patch: &Path) -> PathBuf {
    let mut name = patch.as_os_str().to_owned();
    name.push(".minisig");
    name.into()
}

fn key_id(keynum: &[u8]) -> String {
    let mut le = [0u8; 8];
    le.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(le))
}

/// Writes a new key pair without a password: `OUT.pub` (share it) and `OUT.key` (keep it; mode
/// 0600).
pub fn keygen(out: &Path) -> Result<(PathBuf, PathBuf)> {
    let (public, secret) = (with_suffix(out, "pub"), with_suffix(out, "key"));
    for p in [&public, &secret] {
        if p.exists() {
            return Err(Error::Exists(p.clone()));
        }
    }
    let bad = |e: minisign::PError| Error::Key { path: secret.clone(), problem: e.to_string() };
    let pair = KeyPair::generate_unencrypted_keypair().map_err(bad)?;
    let pk = pair.pk.to_box().map_err(bad)?.into_string();
    let sk = pair.sk.to_box(Some("factpatch secret key")).map_err(bad)?.into_string();
    write_new(&secret, sk.as_bytes(), 0o600)?;
    write_new(&public, pk.as_bytes(), 0o644)?;
    Ok((public, secret))
}

fn with_suffix(path: &Path, ext: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    name.into()
}

/// Creates `path` (which must not exist) with `bytes`, readable per `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err(path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io_err(path))?;
    Ok(())
}

/// Signs `patch` with the secret key at `key` (from `factpatch keygen`; a password-protected
/// minisign key asks for its password on the terminal) and writes `PATCH.minisig`; returns its
/// path and the signer.
pub fn sign(patch: &Patch, key: &Path) -> Result<(PathBuf, Signer)> {
    let out = signature_path(patch.path());
    if out.exists() {
        return Err(Error::Exists(out));
    }
    let bad = |e: minisign::PError| Error::Key { path: key.to_path_buf(), problem: e.to_string() };
    let text = std::fs::read_to_string(key).map_err(io_err(key))?;
    // A key without a password opens as it is; one with a password asks for it.
    let boxed = || SecretKeyBox::from_string(&text).map_err(bad);
    let sk: SecretKey = match boxed()?.into_unencrypted_secret_key() {
        Ok(sk) => sk,
        Err(plain) => boxed()?.into_secret_key(None).map_err(|e| if e.to_string().contains("not encrypted") { bad(plain) } else { bad(e) })?,
    };
    let comment = format!("factpatch patch {}", patch.id());
    let pk = PublicKey::from_secret_key(&sk).map_err(bad)?;
    let sig = minisign::sign(Some(&pk), &sk, Cursor::new(patch.bytes()), Some(&comment), None).map_err(bad)?;
    crate::atomic::write(&out, sig.into_string().as_bytes(), &crate::atomic::Policy::new()).map_err(io_err(&out))?;
    Ok((out, Signer { key_id: key_id(pk.keynum()), trusted_comment: comment }))
}

/// Public keys a verifier trusts, read from minisign `.pub` files (or files of bare base64 keys,
/// one a line).
#[derive(Clone, Debug, Default)]
pub struct Trusted {
    keys: Vec<PublicKey>,
}

impl Trusted {
    /// Reads every key in `files`; a file with none is an error.
    pub fn read(files: &[PathBuf]) -> Result<Self> {
        let mut keys = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            let found: Vec<PublicKey> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
                .map(|l| PublicKey::from_base64(l).or_else(|_| PublicKeyBox::from_string(l).and_then(|b| b.into_public_key())))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Key { path: path.clone(), problem: format!("not a minisign public key: {e}") })?;
            if found.is_empty() {
                return Err(Error::Key { path: path.clone(), problem: "holds no public key".into() });
            }
            keys.extend(found);
        }
        Ok(Trusted { keys })
    }

    /// Checks `patch`'s signature over the bytes it was read from against these keys.
    pub fn verify(&self, patch: &Patch) -> Result<Signer> {
        let (sig, signer) =
            read_signature(patch.path())?.ok_or_else(|| Error::Unsigned { patch: patch.path().to_path_buf(), signature: signature_path(patch.path()) })?;
        let key = self
            .keys
            .iter()
            .find(|k| k.keynum() == sig.keynum())
            .ok_or_else(|| Error::Untrusted { patch: patch.path().to_path_buf(), key_id: signer.key_id.clone() })?;
        minisign::verify(key, &sig, Cursor::new(patch.bytes()), true, false, false).map_err(|e| Error::Invalid {
            patch: patch.path().to_path_buf(),
            key_id: signer.key_id.clone(),
            problem: e.to_string(),
        })?;
        Ok(signer)
    }
}

/// The signature beside `patch` and who it claims signed (not verified), if there is one.
pub fn read_signature(patch: &Path) -> Result<Option<(SignatureBox, Signer)>> {
    let path = signature_path(patch);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e).into()),
    };
    let malformed = |e: minisign::PError| Error::Malformed { signature: path.clone(), problem: e.to_string() };
    let sig = SignatureBox::from_string(&text).map_err(malformed)?;
    let signer = Signer { key_id: key_id(sig.keynum()), trusted_comment: sig.trusted_comment().map_err(malformed)? };
    Ok(Some((sig, signer)))
}

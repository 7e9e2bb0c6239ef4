//! A validating walk over a GGUF header, run before candle's reader touches the file.
//!
//! candle's `Content::read` already bounds most counts by the file size, but it reports problems
//! without naming the tensor, panics on `general.alignment = 0` (division by zero) and on tensor
//! dimensions whose product overflows, and only learns that tensor data runs past the end of the
//! file when the tensor is read. This walk allocates nothing in proportion to what the file
//! claims; it checks everything candle relies on and reports it with the key or tensor name.
//! Its limits mirror candle's (and llama.cpp's) so that a file it accepts, candle parses.
//!
//! Layout (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>): magic `GGUF`, u32
//! version, tensor count, kv count (u64; u32 in version 1), the key/value pairs, the tensor
//! infos (name, u32 n_dims, dims innermost first, u32 ggml type, u64 offset), padding to
//! `general.alignment` (default 32), then tensor data.

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::GgmlDType;

use super::GgufError;

/// candle's caps (`GGUF_MAX_STRING_LENGTH`, `GGUF_MAX_ARRAY_ELEMENTS`, `GGML_MAX_DIMS`, value
/// nesting depth); exceeding them makes candle refuse the file, so refuse it here with context.
const MAX_STRING_LENGTH: u64 = 1 << 30;
const MAX_ARRAY_ELEMENTS: u64 = 1 << 30;
const MAX_TENSOR_DIMS: u32 = 4;
const MAX_VALUE_DEPTH: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Value type ids of the GGUF spec.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The ggml tensor types candle can load and dequantise, by their on-disk id.
pub(super) fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Checks the whole header of the GGUF image `bytes` (the file `path`) and the extent of every
/// tensor's data.
pub(super) fn validate(bytes: &[u8], path: &Path) -> Result<(), GgufError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
        v1: false,
    };
    let magic = r.u32("the magic number")?;
    if magic != 0x4655_4747 {
        return Err(r.header_err(0, format!("magic is 0x{magic:08x}, expected \"GGUF\"")));
    }
    let version = r.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(r.header_err(
            4,
            format!("version {version} is not supported (this reader knows versions 1 to 3)"),
        ));
    }
    r.v1 = version == 1;
    let tensor_count = r.len("the tensor count")?;
    let kv_count = r.len("the metadata count")?;
    // Minimum on-disk sizes: a kv is a key length, a u32 type and at least one byte of value; a
    // tensor info a name length, n_dims, type and offset.
    let prefix = r.len_size();
    let needed = kv_count
        .saturating_mul(prefix + 5)
        .saturating_add(tensor_count.saturating_mul(prefix + 16));
    if tensor_count > MAX_ARRAY_ELEMENTS || kv_count > MAX_ARRAY_ELEMENTS || needed > r.remaining() {
        return Err(r.header_err(
            8,
            format!(
                "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
                 which cannot fit in the {} bytes of the file",
                bytes.len()
            ),
        ));
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for index in 0..kv_count {
        let key = r.string(&format!("the key of metadata entry {index}"))?;
        if !keys.insert(key.clone()) {
            return Err(r.value_err(&key, "appears twice in the header".to_string()));
        }
        let ty = r.u32(&format!("the value type of `{key}`"))?;
        let value_start = r.pos;
        r.skip_value(ty, 0, &key)?;
        if key == "general.alignment" {
            // candle only honours these integer types (anything else means the default).
            let raw = &bytes[value_start..r.pos];
            let value = match ty {
                vt::U8 => Some(i64::from(raw[0])),
                vt::I8 => Some(i64::from(raw[0] as i8)),
                vt::U16 => Some(i64::from(u16::from_le_bytes([raw[0], raw[1]]))),
                vt::I16 => Some(i64::from(i16::from_le_bytes([raw[0], raw[1]]))),
                vt::U32 => Some(i64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))),
                vt::I32 => Some(i64::from(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))),
                _ => None,
            };
            match value {
                Some(0) => return Err(r.value_err(&key, "is 0; it must be a positive byte count".into())),
                Some(a) if a > 0 => alignment = a.unsigned_abs(),
                _ => {}
            }
        }
    }

    struct Extent {
        name: String,
        offset: u64,
        size: u64,
    }
    let mut extents = Vec::new();
    let mut names = HashSet::new();
    for index in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {index}"))?;
        if !names.insert(name.clone()) {
            return Err(r.tensor_err(&name, "appears twice in the header".to_string()));
        }
        let n_dims = r.u32(&format!("the rank of tensor `{name}`"))?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(r.tensor_err(
                &name,
                format!("has {n_dims} dimensions; GGUF allows at most {MAX_TENSOR_DIMS}"),
            ));
        }
        let mut elements: u64 = 1;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.len(&format!("a dimension of tensor `{name}`"))?;
            dims.push(d);
            elements = elements.checked_mul(d).ok_or_else(|| {
                r.tensor_err(
                    &name,
                    format!("has dimensions {dims:?}... whose product overflows"),
                )
            })?;
        }
        let type_id = r.u32(&format!("the type of tensor `{name}`"))?;
        let offset = r.u64(&format!("the data offset of tensor `{name}`"))?;
        let dtype = ggml_dtype(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            ggml_type: type_id,
        })?;
        let block = dtype.block_size() as u64;
        if !elements.is_multiple_of(block) {
            return Err(r.tensor_err(
                &name,
                format!(
                    "has {elements} elements (dimensions {dims:?}), not a multiple of the \
                     {block}-element block of its type {dtype:?}"
                ),
            ));
        }
        let size = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .filter(|s| usize::try_from(*s).is_ok())
            .ok_or_else(|| r.tensor_err(&name, format!("dimensions {dims:?} are too large")))?;
        extents.push(Extent { name, offset, size });
    }

    let data_start = (r.pos as u64)
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| r.value_err("general.alignment", format!("{alignment} is too large")))?;
    let file_len = bytes.len() as u64;
    for e in &extents {
        let end = data_start
            .checked_add(e.offset)
            .and_then(|start| start.checked_add(e.size));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(r.tensor_err(
                    &e.name,
                    format!(
                        "needs {} bytes at offset {} past the data start {data_start}, but the \
                         file has only {file_len} bytes; the file is truncated or corrupt, fetch \
                         it again",
                        e.size, e.offset
                    ),
                ))
            }
        }
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    v1: bool,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn len_size(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    fn header_err(&self, offset: usize, reason: String) -> GgufError {
        GgufError::Header {
            path: self.path.to_path_buf(),
            offset: offset as u64,
            reason,
        }
    }

    fn value_err(&self, key: &str, reason: String) -> GgufError {
        GgufError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason,
        }
    }

    fn tensor_err(&self, tensor: &str, reason: String) -> GgufError {
        GgufError::BadTensor {
            path: self.path.to_path_buf(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.header_err(
                self.pos,
                format!(
                    "{what} needs {n} bytes, only {} remain; the file is truncated",
                    self.remaining()
                ),
            ));
        }
        let n = n as usize; // n <= remaining, which fits in usize
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length or count: u32 in GGUF version 1, u64 after.
    fn len(&mut self, what: &str) -> Result<u64, GgufError> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let start = self.pos;
        let n = self.len(what)?;
        if n > MAX_STRING_LENGTH {
            return Err(self.header_err(
                start,
                format!("{what} claims a length of {n} bytes (limit {MAX_STRING_LENGTH})"),
            ));
        }
        let b = self.take(n, what)?;
        Ok(String::from_utf8_lossy(b).trim_end_matches('\0').to_string())
    }

    /// Skips one value of type `ty`, checking it the way candle's reader will.
    fn skip_value(&mut self, ty: u32, depth: usize, key: &str) -> Result<(), GgufError> {
        if depth > MAX_VALUE_DEPTH {
            return Err(self.value_err(key, format!("nests arrays deeper than {MAX_VALUE_DEPTH} levels")));
        }
        let what = format!("the value of `{key}`");
        match ty {
            vt::U8 | vt::I8 => self.take(1, &what).map(drop),
            vt::U16 | vt::I16 => self.take(2, &what).map(drop),
            vt::U32 | vt::I32 | vt::F32 => self.take(4, &what).map(drop),
            vt::U64 | vt::I64 | vt::F64 => self.take(8, &what).map(drop),
            vt::BOOL => match self.take(1, &what)?[0] {
                0 | 1 => Ok(()),
                b => Err(self.value_err(key, format!("holds the bool byte {b}; only 0 and 1 are valid"))),
            },
            vt::STRING => {
                let start = self.pos;
                let n = self.len(&what)?;
                if n > MAX_STRING_LENGTH {
                    return Err(self.header_err(
                        start,
                        format!("{what} claims a string of {n} bytes (limit {MAX_STRING_LENGTH})"),
                    ));
                }
                self.take(n, &what).map(drop)
            }
            vt::ARRAY => {
                let elem = self.u32(&what)?;
                let n = self.len(&what)?;
                let min = match elem {
                    vt::U8 | vt::I8 | vt::BOOL => 1,
                    vt::U16 | vt::I16 => 2,
                    vt::U32 | vt::I32 | vt::F32 => 4,
                    vt::U64 | vt::I64 | vt::F64 => 8,
                    vt::STRING => self.len_size(),
                    vt::ARRAY => 4 + self.len_size(),
                    other => {
                        return Err(self.value_err(key, format!("is an array of unknown value type {other}")))
                    }
                };
                if n > MAX_ARRAY_ELEMENTS || n.saturating_mul(min) > self.remaining() {
                    return Err(self.value_err(
                        key,
                        format!(
                            "claims {n} array elements, which cannot fit in the {} bytes left \
                             in the file; the file is truncated or corrupt",
                            self.remaining()
                        ),
                    ));
                }
                match elem {
                    vt::STRING | vt::ARRAY | vt::BOOL => {
                        for _ in 0..n {
                            self.skip_value(elem, depth + 1, key)?;
                        }
                        Ok(())
                    }
                    _ => self.take(n * min, &what).map(drop),
                }
            }
            other => Err(self.value_err(key, format!("has unknown value type {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal version-3 GGUF image: the given kv pairs (already encoded) and tensor infos.
    fn image(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        for (k, ty, v) in kvs {
            s(&mut b, k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        for (name, dims, ty, off) in tensors {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.resize(b.len() + data, 0);
        b
    }

    fn check(b: &[u8]) -> Result<(), GgufError> {
        validate(b, Path::new("x.gguf"))
    }

    #[test]
    fn accepts_a_well_formed_image() {
        let b = image(
            &[("a", vt::U32, 7u32.to_le_bytes().to_vec())],
            &[("t", &[4, 2], 0, 0)],
            32,
        );
        check(&b).expect("valid");
    }

    #[test]
    fn rejects_data_past_the_end_naming_the_tensor() {
        let b = image(&[], &[("blk.0.x", &[4, 2], 0, 0)], 31);
        let err = check(&b).expect_err("32 bytes needed").to_string();
        assert!(err.contains("blk.0.x") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn rejects_unknown_tensor_type_naming_the_tensor() {
        let b = image(&[], &[("weird", &[32], 99, 0)], 64);
        match check(&b) {
            Err(GgufError::UnsupportedTensorType {
                tensor,
                ggml_type: 99,
                ..
            }) => assert_eq!(tensor, "weird"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_zero_alignment_that_would_divide_by_zero_in_candle() {
        let b = image(
            &[("general.alignment", vt::U32, 0u32.to_le_bytes().to_vec())],
            &[],
            0,
        );
        match check(&b) {
            Err(GgufError::BadValue { key, .. }) => assert_eq!(key, "general.alignment"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_overflowing_dimensions() {
        let b = image(&[], &[("big", &[u64::MAX, 3], 0, 0)], 0);
        let err = check(&b).expect_err("overflow").to_string();
        assert!(err.contains("big") && err.contains("overflows"), "{err}");
    }

    #[test]
    fn rejects_absurd_counts_before_reading_them() {
        let mut b = image(&[], &[], 0);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = check(&b).expect_err("count").to_string();
        assert!(err.contains("cannot fit"), "{err}");
    }

    #[test]
    fn rejects_array_longer_than_the_file() {
        let mut v = vt::U32.to_le_bytes().to_vec();
        v.extend_from_slice(&(1u64 << 20).to_le_bytes());
        let b = image(&[("tokenizer.ggml.token_type", vt::ARRAY, v)], &[], 0);
        match check(&b) {
            Err(GgufError::BadValue { key, .. }) => assert_eq!(key, "tokenizer.ggml.token_type"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = image(
            &[("general.architecture", vt::STRING, {
                let mut v = 5u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"llama");
                v
            })],
            &[("t", &[8], 0, 0)],
            32,
        );
        check(&b).expect("valid");
        for n in 0..b.len() {
            assert!(check(&b[..n]).is_err(), "prefix of {n} bytes accepted");
        }
    }
}

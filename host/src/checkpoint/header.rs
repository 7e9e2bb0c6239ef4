//! The safetensors header: parsing with full validation, and building one for the writer.
//!
//! The `safetensors` crate's parser is not used on purpose: it stops at the first problem with an
//! error that names neither file nor tensor, takes the last of two duplicate keys silently, and
//! refuses gaps between tensors. Here every rule is checked with a message that says where.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use candle_core::DType;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::CheckpointError;

/// The largest header accepted, as in the `safetensors` crate.
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// Size of the little-endian header length that starts every file.
const LEN_PREFIX: u64 = 8;

/// One tensor of a validated header; offsets are relative to the start of the data section.
#[derive(Debug, Clone)]
pub(crate) struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A validated header: where the data section starts, and the tensors in offset order.
#[derive(Debug)]
pub(crate) struct ParsedHeader {
    pub data_start: u64,
    pub entries: Vec<HeaderEntry>,
}

/// The safetensors dtype string of a candle dtype, for the types both sides support.
pub(crate) fn st_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::U32 => "U32",
        DType::U8 => "U8",
        DType::F8E4M3 => "F8_E4M3",
        _ => return None,
    })
}

/// The candle dtype of a safetensors dtype string. Sub-byte and unsigned types candle lacks
/// (U16, U64, BOOL, F8_E5M2, F4, ...) are not supported.
pub(crate) fn st_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        "F8_E4M3" => DType::F8E4M3,
        _ => return None,
    })
}

/// Number of bytes of a tensor, `None` on overflow.
pub(crate) fn byte_len(dtype: DType, shape: &[usize]) -> Option<u64> {
    let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))?;
    numel.checked_mul(dtype.size_in_bytes() as u64)
}

/// The header's top-level object as (key, value) pairs in file order, duplicates kept so they
/// can be reported instead of silently overwritten.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                // The size hint comes from the file; cap it so a hostile one cannot reserve much.
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(pair) = map.next_entry::<String, serde_json::Value>()? {
                    pairs.push(pair);
                }
                Ok(RawHeader(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Parses and validates the header of the safetensors file `bytes` (the whole file).
///
/// Checks: header length within the limit and the file; UTF-8 JSON object; `__metadata__` an
/// object of strings; each tensor's fields, dtype, offsets within the data section, byte length
/// equal to numel × dtype size; no duplicate names; no two tensors sharing bytes.
pub(crate) fn parse_header(bytes: &[u8], path: &Path) -> Result<ParsedHeader, CheckpointError> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..LEN_PREFIX as usize) else {
        return Err(CheckpointError::HeaderTruncated {
            path: path.to_path_buf(),
            file_len,
        });
    };
    let mut len_bytes = [0u8; LEN_PREFIX as usize];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(CheckpointError::HeaderTooLarge {
            path: path.to_path_buf(),
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    let data_start = LEN_PREFIX + header_len;
    if data_start > file_len {
        return Err(CheckpointError::HeaderBeyondFile {
            path: path.to_path_buf(),
            header_len,
            file_len,
        });
    }
    let invalid = |reason: String| CheckpointError::HeaderInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let header_bytes = &bytes[LEN_PREFIX as usize..data_start as usize];
    let header_text =
        std::str::from_utf8(header_bytes).map_err(|e| invalid(format!("the header is not UTF-8 ({e})")))?;
    let RawHeader(pairs) = serde_json::from_str(header_text)
        .map_err(|e| invalid(format!("the header is not a JSON object ({e})")))?;

    let data_len = file_len - data_start;
    let mut seen = HashSet::with_capacity(pairs.len());
    let mut entries = Vec::with_capacity(pairs.len());
    let mut seen_metadata = false;
    for (name, value) in pairs {
        if name == "__metadata__" {
            if seen_metadata {
                return Err(invalid("the key `__metadata__` appears twice".into()));
            }
            seen_metadata = true;
            let ok = value
                .as_object()
                .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                return Err(invalid(
                    "`__metadata__` must be an object of string values".into(),
                ));
            }
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("tensor `{name}` appears twice")));
        }
        let raw: RawEntry = serde_json::from_value(value).map_err(|e| {
            invalid(format!(
                "tensor `{name}` must be {{\"dtype\": str, \"shape\": [int], \"data_offsets\": \
                 [int, int]}} ({e})"
            ))
        })?;
        let Some(dtype) = st_dtype(&raw.dtype) else {
            return Err(CheckpointError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name,
                dtype: raw.dtype,
            });
        };
        let (start, end) = raw.data_offsets;
        if end < start {
            return Err(invalid(format!(
                "tensor `{name}` has data_offsets [{start}, {end}], which end before they start"
            )));
        }
        if end > data_len {
            return Err(CheckpointError::TensorOutOfBounds {
                path: path.to_path_buf(),
                tensor: name,
                start,
                end,
                data_len,
            });
        }
        let Some(expected) = byte_len(dtype, &raw.shape) else {
            return Err(CheckpointError::ShapeOverflow {
                path: path.to_path_buf(),
                tensor: name,
                shape: raw.shape,
            });
        };
        if expected != end - start {
            return Err(CheckpointError::TensorSizeMismatch {
                path: path.to_path_buf(),
                tensor: name,
                dtype,
                shape: raw.shape,
                expected,
                actual: end - start,
            });
        }
        entries.push(HeaderEntry {
            name,
            dtype,
            shape: raw.shape,
            start,
            end,
        });
    }

    entries.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    // Empty tensors own no bytes, so they cannot overlap anything.
    let mut furthest: Option<(u64, &str)> = None;
    for entry in entries.iter().filter(|e| e.end > e.start) {
        if let Some((end, owner)) = furthest {
            if entry.start < end {
                return Err(CheckpointError::TensorsOverlap {
                    path: path.to_path_buf(),
                    first: owner.to_string(),
                    second: entry.name.clone(),
                });
            }
        }
        if furthest.is_none_or(|(end, _)| entry.end > end) {
            furthest = Some((entry.end, &entry.name));
        }
    }

    Ok(ParsedHeader { data_start, entries })
}

/// One tensor of a shard to be written; offsets relative to the data section.
pub(crate) struct HeaderOut<'a> {
    pub name: &'a str,
    pub dtype: &'static str,
    pub shape: &'a [usize],
    pub start: u64,
    pub end: u64,
}

/// Builds the complete header bytes (length prefix included) of a shard, tensors in the given
/// order, metadata `{"format":"pt"}`, padded with spaces so the data section starts at a multiple
/// of 8 as the `safetensors` crate does.
pub(crate) fn build_header(tensors: &[HeaderOut<'_>]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for t in tensors {
        json.push(',');
        // A `str` always serialises; the fallback only keeps this infallible without unwrap.
        json.push_str(&serde_json::to_string(t.name).unwrap_or_else(|_| format!("{:?}", t.name)));
        json.push_str(":{\"dtype\":\"");
        json.push_str(t.dtype);
        json.push_str("\",\"shape\":[");
        let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        json.push_str(&dims.join(","));
        json.push_str(&format!("],\"data_offsets\":[{},{}]}}", t.start, t.end));
    }
    json.push('}');
    let padded = json.len().next_multiple_of(LEN_PREFIX as usize);
    let mut out = Vec::with_capacity(LEN_PREFIX as usize + padded);
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(LEN_PREFIX as usize + padded, b' ');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    fn parse(bytes: &[u8]) -> Result<ParsedHeader, CheckpointError> {
        parse_header(bytes, Path::new("x.safetensors"))
    }

    #[test]
    fn built_header_parses_with_safetensors_crate() {
        let shape = [2usize, 3];
        let header = build_header(&[
            HeaderOut {
                name: "a\"b",
                dtype: "F32",
                shape: &shape,
                start: 0,
                end: 24,
            },
            HeaderOut {
                name: "c",
                dtype: "BF16",
                shape: &[1],
                start: 24,
                end: 26,
            },
        ]);
        assert_eq!(header.len() % 8, 0);
        let mut bytes = header.clone();
        bytes.resize(header.len() + 26, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("crate accepts it");
        assert_eq!(st.tensor("a\"b").expect("present").shape(), &[2, 3]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let parsed = parse(&bytes).expect("own parser accepts it");
        assert_eq!(parsed.data_start as usize, header.len());
        assert_eq!(parsed.entries[0].name, "a\"b");
        assert_eq!(parsed.entries[1].dtype, DType::BF16);
    }

    #[test]
    fn duplicate_key_in_one_header_is_reported() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = parse(&file(h, 2)).expect_err("duplicate");
        assert!(err.to_string().contains("`a` appears twice"), "{err}");
    }

    #[test]
    fn gaps_are_allowed_and_empty_tensors_never_overlap() {
        let h = r#"{"e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]}}"#;
        let parsed = parse(&file(h, 5)).expect("valid");
        let names: Vec<_> = parsed.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "e", "b"]);
    }

    #[test]
    fn overlap_names_both_tensors() {
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = parse(&file(h, 4)).expect_err("overlap");
        let msg = err.to_string();
        assert!(msg.contains("`a`") && msg.contains("`b`"), "{msg}");
    }

    #[test]
    fn bad_entries_are_errors() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "end before",
            ),
            (r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, "Q4"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "8 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#,
                "overflows",
            ),
            (r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#, "shape"),
            (r#"{"__metadata__":{"k":1}}"#, "__metadata__"),
            (r#"[1,2]"#, "JSON object"),
        ];
        for (h, needle) in cases {
            let err = parse(&file(h, 4)).expect_err(h);
            assert!(err.to_string().contains(needle), "{h}: {err}");
        }
    }
}
